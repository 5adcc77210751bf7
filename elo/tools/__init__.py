"""Small utilities every part uses: atomic files and directories, JSON Lines, the command-line layer."""
