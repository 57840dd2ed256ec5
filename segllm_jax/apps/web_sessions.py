"""The web demo's per-tab sessions: a :class:`SessionStore` of :class:`UserSession` (architecture.md §E3).

Every browser tab (Gradio ``session_hash``) gets its own :class:`~segllm_jax.session.MultiRoundSession`
and its own folder of files, so users never see each other's image, masks or history. Sessions are
released on demand (tab closed, "New image"), after ``idle_timeout_s`` without a request (a background
sweeper), and at most ``max_sessions`` live at once. No Gradio here: :mod:`segllm_jax.apps.web_demo`
builds the UI on top of this store.
"""

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from PIL import Image

from segllm_jax.errors import InputError
from segllm_jax.outputs import atomic_save_image
from segllm_jax.session import MultiRoundSession

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT_S = 1800.0
DEFAULT_MAX_SESSIONS = 16  # each live session holds image features and a KV cache of the full context


@dataclasses.dataclass(eq=False)
class UserSession:
    """One browser tab's conversation: its MultiRoundSession and the pictures/files made from it."""

    key: str
    session: MultiRoundSession
    files: Path  # this user's mask PNGs (deleted on release)
    last_used: float
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    overlays: list[str] = dataclasses.field(default_factory=list)  # overlay PNG per round (this folder)
    mask_files: list[str] = dataclasses.field(default_factory=list)

    def save(self, name: str, image: Image.Image) -> str:
        """``files/name`` written completely (temporary name, rename) and made read-only, then its path."""
        path = atomic_save_image(self.files / name, image)
        os.chmod(path, 0o444)
        return str(path)

    def reset_history(self) -> None:
        for f in (*self.overlays, *self.mask_files):
            Path(f).unlink(missing_ok=True)
        self.overlays.clear()
        self.mask_files.clear()


class SessionStore:
    """Live per-user sessions, keyed by Gradio's ``session_hash``; released on close, idle or demand."""

    def __init__(self, *, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 sweep_interval_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.idle_timeout_s, self.max_sessions, self.clock = float(idle_timeout_s), int(max_sessions), clock
        self._sessions: dict[str, UserSession] = {}
        self._lock = threading.Lock()
        self._root = Path(tempfile.mkdtemp(prefix="segllm-web-"))  # everything temporary of this demo
        self._stop = threading.Event()
        self.released = 0  # how many sessions were released so far (for tests and logs)
        interval = sweep_interval_s if sweep_interval_s is not None else min(60.0, max(1.0, self.idle_timeout_s / 4))
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(interval,), daemon=True,
                                         name="segllm-web-sweeper")
        self._sweeper.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def get(self, key: str | None) -> UserSession | None:
        with self._lock:
            user = self._sessions.get(key or "")
            if user is not None:
                user.last_used = self.clock()
            return user

    def check_room(self, key: str) -> None:
        """Raises :class:`InputError` if a new session for ``key`` would exceed ``max_sessions``."""
        self.sweep()
        with self._lock:
            if len(self._sessions) - (key in self._sessions) >= self.max_sessions:
                raise InputError(f"The demo is serving its maximum of {self.max_sessions} sessions; "
                                 "try again in a few minutes.")

    @property
    def root(self) -> Path:
        """The demo's temporary folder (sessions' files, generated examples); removed by :meth:`close`."""
        return self._root

    def put(self, key: str, session: MultiRoundSession) -> UserSession:
        """Stores a new session for ``key`` (replacing, i.e. releasing, the old one); refuses when the
        store is full. Counting and inserting happen under one lock: concurrent uploads never overshoot."""
        self.release(key)
        self.sweep()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise InputError(f"The demo is serving its maximum of {self.max_sessions} sessions; "
                                 "try again in a few minutes.")
            files = self._root / "sessions" / uuid.uuid4().hex
            files.mkdir(parents=True)
            user = UserSession(key, session, files, self.clock())
            self._sessions[key] = user
            return user

    def release(self, key: str | None) -> bool:
        with self._lock:
            user = self._sessions.pop(key or "", None)
            if user is None:
                return False
            self.released += 1
        shutil.rmtree(user.files, ignore_errors=True)
        return True

    def sweep(self) -> int:
        """Releases sessions idle for longer than the timeout (not those busy with a request)."""
        now = self.clock()
        with self._lock:
            stale = [k for k, u in self._sessions.items()
                     if now - u.last_used > self.idle_timeout_s and not u.lock.locked()]
        for key in stale:
            self.release(key)
        if stale:
            log.info("web demo: released %d idle session(s)", len(stale))
        return len(stale)

    def close(self) -> None:
        self._stop.set()
        for key in self.keys():
            self.release(key)
        shutil.rmtree(self._root, ignore_errors=True)

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except Exception:  # never let the sweeper die
                log.exception("web demo: session sweep failed")
