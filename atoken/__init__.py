"""atoken."""
