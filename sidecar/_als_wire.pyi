from typing import Optional

class WireError(ValueError): ...

def read_message(data: bytes, namespace: str) -> list[
    tuple[dict[str, str], str, int, bytes, Optional[dict[str, str]], int, int, int, str, int,
          int]]: ...
