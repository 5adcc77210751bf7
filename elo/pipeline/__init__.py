"""The whole method as one command: a recipe read and checked, its stages run in order, and the report."""
