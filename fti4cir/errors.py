class UserError(Exception):
    """An error caused by user input; shown without a traceback."""
