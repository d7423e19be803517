"""Real clients (curl, wget, aria2c, pip, the console scripts) against the streamer."""
