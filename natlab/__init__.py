"""natlab: real kernel NATs in network namespaces, to prove NAT traversal."""
