"""Child processes that die with the daemon: engines and trainers both run through this."""
