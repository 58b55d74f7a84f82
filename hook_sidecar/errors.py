"""The one exception the hook's pure core raises on bad input (standard library only)."""


class HookInputError(ValueError):
    """Bad hook input (domain XML, VMI JSON or an annotation); the message says what and why."""
