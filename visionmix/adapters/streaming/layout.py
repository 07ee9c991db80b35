"""Which chunks a streaming step sees, where they sit in the cache, and at which RoPE positions.

A stream is generated in chunks of ``frames_per_chunk`` frames. Chunk ``c`` attends to the sink (the first
``sink_chunks`` chunks, kept forever), the last ``window_chunks`` chunks before it, and itself. A chunk that
leaves the window is absorbed into the linear memory exactly once. Keys are cached before RoPE: the window and
the current chunk are rotated at positions that end at the query's last frame, the sink at its own first
frames, and the query starts at ``min(c * frames_per_chunk, rope_frame_cap)``, so positions stop growing
once the cap is reached (Hybrid Forcing, https://arxiv.org/abs/2604.10103).
"""
from dataclasses import dataclass
from typing import List, Optional

__all__ = ['StreamLayout']


@dataclass(frozen=True)
class StreamLayout:
    frames_per_chunk: int
    tokens_per_frame: int
    sink_chunks: int = 1
    window_chunks: Optional[int] = 2
    max_chunks: Optional[int] = None
    rope_frame_cap: Optional[int] = None

    def __post_init__(self):
        for name in ('frames_per_chunk', 'tokens_per_frame'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.sink_chunks, int) or self.sink_chunks < 0:
            raise ValueError(f"sink_chunks must be an int >= 0, got {self.sink_chunks!r}")
        if self.window_chunks is None:
            if self.max_chunks is None or self.max_chunks < 1:
                raise ValueError('an unbounded window (window_chunks=None) needs max_chunks >= 1 to preallocate '
                                 f'the cache, got max_chunks={self.max_chunks!r}')
        elif not isinstance(self.window_chunks, int) or self.window_chunks < 0:
            raise ValueError(f"window_chunks must be an int >= 0 or None (unbounded), got {self.window_chunks!r}")
        if self.rope_frame_cap is not None:
            if self.window_chunks is None:
                raise ValueError('rope_frame_cap needs a bounded window (window_chunks not None)')
            least = (self.sink_chunks + self.window_chunks) * self.frames_per_chunk
            if self.rope_frame_cap < least:
                raise ValueError(f"rope_frame_cap must be at least (sink_chunks + window_chunks) * frames_per_chunk "
                                 f"= {least} so window positions never overlap the sink, got {self.rope_frame_cap}")

    @property
    def chunk_tokens(self) -> int:
        return self.frames_per_chunk * self.tokens_per_frame

    @property
    def history_chunks(self) -> int:
        """Chunks of history the cache holds besides the current one."""
        if self.window_chunks is None:
            return self.max_chunks - 1
        return self.sink_chunks + self.window_chunks

    @property
    def cache_tokens(self) -> int:
        return (self.history_chunks + 1) * self.chunk_tokens

    @property
    def bounded(self) -> bool:
        return self.window_chunks is not None

    def history(self, chunk: int) -> List[int]:
        """Ids of the cached chunks chunk ``chunk`` attends to besides itself, oldest first (= cache order)."""
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0, got {chunk}")
        if not self.bounded and chunk >= self.max_chunks:
            raise ValueError(f"chunk {chunk} is beyond max_chunks={self.max_chunks} of the unbounded-window cache")
        if chunk <= self.history_chunks:
            return list(range(chunk))
        return list(range(self.sink_chunks)) + list(range(chunk - self.window_chunks, chunk))

    def evicted(self, chunk: int) -> Optional[int]:
        """The chunk that leaves the window when ``chunk`` is committed (absorbed into memory then), if any."""
        if not self.bounded:
            return None
        gone = set(self.history(chunk) + [chunk]) - set(self.history(chunk + 1))
        return gone.pop() if gone else None

    def absorbed(self, chunk: int) -> List[int]:
        """Every chunk absorbed into memory before chunk ``chunk`` is generated."""
        return [c for c in range(chunk) if self.bounded and c not in self.history(chunk)]

    def query_start(self, chunk: int) -> int:
        start = chunk * self.frames_per_chunk
        return start if self.rope_frame_cap is None else min(start, self.rope_frame_cap)

    def frame_positions(self, chunk: int) -> List[int]:
        """RoPE frame positions of the cached history and the current chunk, in cache order."""
        f, start = self.frames_per_chunk, self.query_start(chunk)
        positions = []
        for c in self.history(chunk) + [chunk]:
            base = c * f if c < self.sink_chunks else start - (chunk - c) * f
            positions.extend(range(base, base + f))
        return positions
