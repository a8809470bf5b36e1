"""Small helpers shared by every subpackage; imports nothing heavy."""
