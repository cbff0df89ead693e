"""The rendezvous server: STUN service now; accounts, presence and relay to come."""
