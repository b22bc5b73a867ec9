"""Self-rewarding: scoring instructions, score reading, region proposals, reward maps, records."""
