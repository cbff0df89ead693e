"""Messaging: envelopes, delivery (outbox, acks, receipts) and the local store."""
