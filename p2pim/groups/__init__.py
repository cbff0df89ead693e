"""Groups: sender keys (seal), the client's group tables (store); the rendezvous keeps
membership (rendezvous.groups) and the client runs it all (p2pim.client.groups)."""
