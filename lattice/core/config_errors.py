"""The one error a config dataclass raises for a value it refuses, naming the field, so
the daemon can say which config key is wrong without reading the message."""


class InvalidSetting(ValueError):
    """``field`` (a dataclass field name) holds a value its dataclass refuses."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.reason = message
