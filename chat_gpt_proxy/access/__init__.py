"""Who may call and how much: named access tokens, their limits, and limits shared across instances."""
