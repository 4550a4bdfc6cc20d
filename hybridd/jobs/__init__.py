"""Jobs on this node's own state: uploaded files now, fine-tuning later; kept in SQLite under the state dir."""
