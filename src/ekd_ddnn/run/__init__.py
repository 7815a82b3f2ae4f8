"""What every command shares: safe file writing and checkpoint IO, the run directory (lock,
record, resume), configuration checks, and the command-line wrapper that turns a user's
mistake into one line."""
