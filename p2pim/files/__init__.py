"""File transfer: offers and answers as envelopes, bytes as resumable chunks (see transfer)."""
