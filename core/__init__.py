"""What every room of the project shares and nothing else: user errors and typed params sections."""
