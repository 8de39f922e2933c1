"""A ring buffer in pure Python (a corpus builder fixture)."""


class RingBuffer:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.head = 0
        self.tail = 0

    def push(self, chunk: bytes) -> int:
        written = 0
        for byte in chunk:
            self.data[self.head] = byte
            self.head = (self.head + 1) % len(self.data)
            written += 1
        return written
