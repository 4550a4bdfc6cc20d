"""What hybridd does for systemd: its unit file, sd_notify, the watchdog, and logs the journal reads well."""
