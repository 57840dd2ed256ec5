"""``segllm-jax serve``: multi-round segmentation in the browser (Gradio), like the original's demo
(architecture.md §E3).

Upload (or pick an example) image, type one query per round, tick earlier rounds under "Reference
instance from round" (or write ``[REF:k]`` in the query), and see the round's overlay plus a gallery of
every round in its own colour. "Clear history" starts the conversation again on the same image,
"New image" drops it. Every round's mask can be downloaded as a PNG.

Design:

* The model is loaded once. Every browser tab (Gradio ``session_hash``) gets its own
  :class:`~segllm_jax.session.MultiRoundSession` in a
  :class:`~segllm_jax.apps.web_sessions.SessionStore` (no Gradio there), so users never see each
  other's image, masks or history. All model calls go through one lock (JAX programs and the KV
  caches are not shared between threads), and each user's events are serialised by a per-user lock.
* Sessions are released when the tab closes (``demo.unload``), after ``idle_timeout_s`` without a
  request (a background sweeper), or by "New image". At most ``max_sessions`` live at once.
* Uploads are limited to ``max_upload_mb`` (Gradio refuses larger files before they reach us) and go
  through the session's own image checks (pixel limit read from the header, decodable picture). The
  upload reaches us unprocessed (``preprocess=False``), so a file that is not a picture gets our one
  sentence, not Gradio's "Could not preprocess input component"; any failed upload also releases
  the tab's session, so the previous image never answers the next question.
* Every picture and mask we return is a file in the session's own folder, written under a temporary
  name, renamed into place and made read-only before Gradio sees it. (Returning PIL images made
  Gradio re-encode them into one shared cache file per content, rewritten in place while another
  request was reading it: truncated responses under load.)
* All temporary folders (sessions, generated examples) live under one root that is removed on exit,
  including on SIGTERM (``serve`` turns it into a clean shutdown).
* :func:`build_app` returns a :class:`WebApp`: the Gradio Blocks, its session store and the launch
  settings side by side (nothing is attached to the Gradio object).
* Gradio is imported lazily: ``import segllm_jax`` never needs it (``pip install 'segllm-jax[demo]'``).
* The default bind address is 127.0.0.1; anything else must be asked for and prints a warning.
"""

import dataclasses
import html
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from segllm_jax.apps.web_sessions import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_SESSIONS, SessionStore, UserSession
from segllm_jax.checkpoint import Loaded
from segllm_jax.errors import InputError, SegLLMError
from segllm_jax.prompt import parse_references
from segllm_jax.session import MultiRoundSession, RoundResult

if TYPE_CHECKING:  # pragma: no cover
    import gradio as gr

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Round k is drawn in ROUND_COLORS[(k - 1) % len]: round 1 is the original's red.
ROUND_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 160, 0), (170, 0, 255),
    (0, 220, 220), (255, 0, 170), (255, 235, 0), (140, 80, 20), (0, 130, 110),
)

TITLE = "SegLLM: multi-round reasoning segmentation"
INTRO = (
    "Upload an image (or pick an example), then ask for one thing per round. Later rounds can refer to "
    "earlier answers: tick the round under *Reference instance from round*, or write `[REF:k]` in the "
    "query (`[REF:1,3]` cites rounds 1 and 3). Each browser tab has its own conversation."
)


def require_gradio():
    """Imports Gradio, or explains in one sentence how to install it."""
    try:
        import gradio
    except ImportError:
        raise SegLLMError("The web demo needs Gradio; install it with: pip install 'segllm-jax[demo]'.") from None
    return gradio


def round_color(index: int) -> tuple[int, int, int]:
    return ROUND_COLORS[(index - 1) % len(ROUND_COLORS)]


def compose_query(text: str, checked: Sequence[int | str] | None) -> str:
    """The text ``session.ask`` gets: the query (stripped) plus a ``[REF:...]`` tag for the ticked rounds.

    Rounds already cited by a ``[REF:k]`` tag in the text are not repeated; the order of references
    is: tags in the text first, then ticked rounds in increasing order. The tag is appended without a
    space, so the question the model sees is exactly the typed text (as in the original demo, where
    the reference box is separate from the query).
    """
    text = (text or "").strip()
    _, in_text = parse_references(text)  # malformed tags raise InputError here, with the same sentence
    extra = sorted({int(k) for k in (checked or [])} - set(in_text))
    return text + (f"[REF:{','.join(map(str, extra))}]" if extra else "")


def example_images(directory: str | Path | None, *, generate: int = 2, size: int = 256,
                   out: str | Path | None = None) -> list[str]:
    """Example pictures: ``<checkpoint>/examples/*`` if present, else ``generate`` MR-Shapes scenes
    written to ``out`` (default: a new temporary folder, which the caller removes)."""
    if directory is not None:
        folder = Path(directory) / "examples"
        if folder.is_dir():
            found = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if found:
                return found
    if generate <= 0:
        return []
    from segllm_jax.data.mrshapes import generate_scene

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="segllm-web-examples-"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(generate):
        scene = generate_scene(np.random.default_rng(seed), size)
        path = out / f"mrshapes_{seed}.png"
        Image.fromarray(scene.image).save(path)
        paths.append(str(path))
    return paths


# ---- the app -----------------------------------------------------------------------------------------


def _history_html(user: UserSession | None) -> str:
    if user is None or not user.session.rounds:
        return "<p><em>No rounds yet.</em></p>"
    rows = []
    for r in user.session.rounds:
        color = "#%02x%02x%02x" % round_color(r.index)
        refs = ", ".join(map(str, r.refs)) or "–"
        rows.append(
            f"<tr><td><span style='display:inline-block;width:1em;height:1em;background:{color}'></span> {r.index}"
            f"</td><td>{html.escape(r.text)}</td><td>{refs}</td><td>{int(r.mask.sum())}</td>"
            f"<td>{r.score:.3f}</td></tr>")
    return ("<table class='segllm-history'><thead><tr><th>round</th><th>query</th><th>refs</th><th>pixels</th>"
            "<th>score</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _status(result: RoundResult) -> str:
    refs = f" (references round {', '.join(map(str, result.refs))})" if result.refs else ""
    box = ", ".join(f"{v:.0f}" for v in result.box)
    what = "an empty mask" if result.empty else f"{int(result.mask.sum())} pixels, box ({box})"
    return f"Round {result.index}: {result.text!r}{refs} → {what}, score {result.score:.3f}."


@dataclasses.dataclass(frozen=True)
class WebApp:
    """A built demo: the Gradio ``blocks``, the ``store`` of its sessions and what :func:`launch` needs."""

    blocks: "gr.Blocks"
    store: SessionStore
    max_file_size: int  # bytes; Gradio refuses larger uploads
    example_dirs: tuple[str, ...]  # folders of the example pictures (served as files)

    def close(self) -> None:
        """Stops the server (if running) and removes every temporary folder of the app."""
        try:
            self.blocks.close(verbose=False)
        finally:
            self.store.close()


def build_app(loaded: Loaded, *, examples: Sequence[str | Path] | str | None = "auto", mode: str = "incremental",
              idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, max_sessions: int = DEFAULT_MAX_SESSIONS,
              max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, model_lock: Any = None,
              sweep_interval_s: float | None = None) -> WebApp:
    """The Gradio app and its session store. Launch it with :func:`launch` (which applies the upload limit).

    ``examples``: ``"auto"`` (the checkpoint's ``examples/`` folder, else two generated MR-Shapes
    scenes), a list of image paths, or ``None``.
    """
    gr = require_gradio()
    if mode not in ("incremental", "recompute"):
        raise InputError(f"mode must be 'incremental' or 'recompute', not {mode!r}.")
    for name, value in (("max_sessions", max_sessions), ("max_upload_mb", max_upload_mb),
                        ("idle_timeout_s", idle_timeout_s)):
        if not value > 0 or value == float("inf"):  # also refuses NaN
            raise InputError(f"{name} must be a positive finite number, not {value!r}.")
    store = SessionStore(idle_timeout_s=idle_timeout_s, max_sessions=max_sessions, sweep_interval_s=sweep_interval_s)
    model_lock = model_lock or threading.Lock()
    max_bytes = int(max_upload_mb * 1024 * 1024)
    if examples == "auto":
        examples = example_images(loaded.directory, out=store.root / "examples")
    examples = [str(p) for p in (examples or [])]

    def fail(e: Exception):
        return gr.Error(str(e), print_exception=False)

    def outputs_for(user: UserSession | None, overlay: str | None = None, status: str = ""):
        n = len(user.session.rounds) if user is not None else 0
        # the gallery never raises: a round whose overlay could not be written is left out
        gallery = ([(path, f"round {r.index}: {r.text}")
                    for path, r in zip(user.overlays, user.session.rounds, strict=False)]
                   if user is not None else [])
        refs = gr.update(choices=[(str(k), k) for k in range(1, n + 1)], value=[])
        files = list(user.mask_files) if user is not None and user.mask_files else None
        return overlay, gallery, refs, files, _history_html(user), status

    def set_image(upload: Any, request: gr.Request):
        """New picture for this tab: builds its session (image features), forgets the old conversation.

        ``upload`` is Gradio's unprocessed file payload (a dict with ``path``, already checked to be in
        Gradio's upload folder). Whatever goes wrong, the tab's old session is released first, so a
        failed upload never leaves the previous image answering questions.
        """
        key = request.session_hash
        store.release(key)
        image_path = upload.get("path") if isinstance(upload, dict) else getattr(upload, "path", upload)
        if not image_path:
            return outputs_for(None, status="Upload an image or pick an example to start.")
        try:
            size = Path(image_path).stat().st_size
            if size > max_bytes:
                raise InputError(f"The image is {size / 2**20:.1f} MB, over the {max_upload_mb:g} MB upload limit.")
            store.check_room(key)  # before spending model time on the picture
            with model_lock:
                session = MultiRoundSession(loaded, image_path, mode=mode)
            user = store.put(key, session)
        except (SegLLMError, OSError) as e:
            store.release(key)
            reason = str(e) if isinstance(e, SegLLMError) else f"The upload cannot be read ({e.strerror})."
            raise gr.Error(f"{reason} The previous image was dropped; upload another picture.",
                           print_exception=False) from None
        w, h = session.image.size
        return outputs_for(user, status=f"Image loaded ({w}×{h}). Ask for something to segment.")

    no_session = ("No image in this session (it may have been closed after being idle); "
                  "upload or pick an image first.")

    def ask(text: str, checked: list[int] | None, request: gr.Request):
        user = store.get(request.session_hash)
        if user is None:
            raise gr.Error(no_session, print_exception=False)
        with user.lock:
            try:
                query = compose_query(text, checked)
                with model_lock:
                    result = user.session.ask(query)
            except SegLLMError as e:
                raise fail(e) from None
            if store.get(request.session_hash) is not user:  # released (tab closed, new image) meanwhile
                raise gr.Error(no_session, print_exception=False)
            k = result.index
            overlay = user.save(f"round_{k}.png", user.session.overlay(result, round_color(k)))
            user.overlays.append(overlay)
            user.mask_files.append(user.save(f"round_{k}_mask.png",
                                             Image.fromarray(result.mask.astype(np.uint8) * 255)))
            return (*outputs_for(user, overlay, _status(result)), "")

    def clear_history(request: gr.Request):
        user = store.get(request.session_hash)
        if user is None:
            return outputs_for(None, status="Upload an image or pick an example to start.")
        with user.lock:
            with model_lock:
                user.session.clear()
            user.reset_history()
            return outputs_for(user, status="History cleared; the image is kept.")

    def new_image(request: gr.Request):
        store.release(request.session_hash)
        return (None, *outputs_for(None, status="Upload an image or pick an example to start."))

    def unload(request: gr.Request):
        store.release(request.session_hash)

    # Gradio's own cache (served overlays, uploads) is cleaned every 15 min of files older than the idle timeout
    cache_age = max(900, int(idle_timeout_s))
    with gr.Blocks(title="SegLLM demo", analytics_enabled=False, delete_cache=(900, cache_age)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                image_in = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                    elem_id="segllm-image", height=360)
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image_in], label="Examples")
            with gr.Column(scale=1):
                overlay_out = gr.Image(label="This round", type="filepath", format="png", interactive=False,
                                       elem_id="segllm-overlay", height=360)
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="e.g. Segment the red circle.  ([REF:1] cites round 1)",
                               elem_id="segllm-query", scale=4, lines=1, max_lines=3)
            refs = gr.CheckboxGroup(label="Reference instance from round", choices=[], value=[], elem_id="segllm-refs",
                                    scale=2)
        with gr.Row():
            send = gr.Button("Segment", variant="primary", elem_id="segllm-send")
            clear = gr.Button("Clear history", elem_id="segllm-clear")
            new = gr.Button("New image", elem_id="segllm-new")
        status = gr.Markdown("Upload an image or pick an example to start.", elem_id="segllm-status")
        gallery = gr.Gallery(label="All rounds", format="png", columns=6, height=280, object_fit="contain",
                             elem_id="segllm-gallery", interactive=False)
        with gr.Row():
            history = gr.HTML(_history_html(None), elem_id="segllm-history")
            masks = gr.File(label="Masks (PNG, one per round)", file_count="multiple", interactive=False,
                            elem_id="segllm-masks")

        round_outputs = [overlay_out, gallery, refs, masks, history, status]
        # progress and error badges go on the overlay only (an error's sentence is shown as a toast)
        image_in.change(set_image, inputs=[image_in], outputs=round_outputs, api_name="set_image",
                        concurrency_limit=4, show_progress_on=[overlay_out], preprocess=False)
        send.click(ask, inputs=[query, refs], outputs=[*round_outputs, query], api_name="ask",
                   concurrency_limit=4, concurrency_id="ask", show_progress_on=[overlay_out])
        query.submit(ask, inputs=[query, refs], outputs=[*round_outputs, query], api_visibility="private",
                     concurrency_limit=4, concurrency_id="ask", show_progress_on=[overlay_out])
        clear.click(clear_history, outputs=round_outputs, api_name="clear_history", show_progress="hidden")
        new.click(new_image, outputs=[image_in, *round_outputs], api_name="new_image", show_progress="hidden")
        demo.unload(unload)

    return WebApp(demo, store, max_bytes, tuple(sorted({str(Path(p).parent) for p in examples})))


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def exposure_warning(host: str, port: int | None) -> str | None:
    """The warning printed when the demo is bound to anything but loopback (``None`` for loopback)."""
    if is_loopback(host):
        return None
    return (f"WARNING: serving the SegLLM demo on {host}:{port}: anyone who can reach this machine can use it "
            "and upload images. Use --host 127.0.0.1 to keep it local.")


def launch(app: WebApp, *, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT,
           prevent_thread_lock: bool = False, quiet: bool = False) -> tuple[Any, str, Any]:
    """Starts the server (queue on, no share link, no SSR, the upload limit of :func:`build_app`)."""
    if (warning := exposure_warning(host, port)) is not None:
        print(warning, file=sys.stderr, flush=True)
    demo = app.blocks
    demo.queue(max_size=64)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up self-checks log every request
    try:
        result = demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False,
                             prevent_thread_lock=True, quiet=True, show_error=True,
                             max_file_size=app.max_file_size, allowed_paths=list(app.example_dirs),
                             footer_links=["api"],
                             enable_monitoring=False, mcp_server=False)
    except OSError as e:  # the port was taken after the CLI checked it
        raise InputError(f"cannot serve on {host}:{port} ({str(e).splitlines()[0][:120]}); pick another "
                         "--port.") from None
    if not quiet:
        print(f"SegLLM demo on {result[1]} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if not prevent_thread_lock:
        demo.block_thread()  # until Ctrl-C; then closes the server
    return result


def warm_up(loaded: Loaded, mode: str = "incremental") -> float:
    """Compiles the model's programs (a two-round conversation with a reference on a generated scene)."""
    from segllm_jax.data.mrshapes import generate_scene

    t = time.perf_counter()
    session = MultiRoundSession(loaded, Image.fromarray(generate_scene(np.random.default_rng(0), 128).image), mode=mode)
    session.ask("Segment the largest shape.")
    session.ask("Segment the shape nearest to it.[REF:1]")
    return time.perf_counter() - t


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, ``docker stop``, systemd) shuts down like Ctrl-C, so the ``finally`` blocks
    remove the temporary folders instead of the process dying with them left behind."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, mode: str = "incremental",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
          max_sessions: int = DEFAULT_MAX_SESSIONS, warmup: bool = True, quantize: str | None = None,
          quantize_vision: bool = False) -> int:
    """``segllm-jax serve``: loads the checkpoint once (``quantize``: see ``segllm_jax.load``), warms it up,
    serves until interrupted (Ctrl-C or SIGTERM), then removes its temporary folders."""
    require_gradio()
    from segllm_jax.checkpoint import load

    loaded = load(checkpoint, quantize=quantize, quantize_vision=quantize_vision)
    if warmup:
        print("compiling the model (one warm-up conversation)...", file=sys.stderr, flush=True)
        print(f"warm-up done in {warm_up(loaded, mode):.1f} s", file=sys.stderr, flush=True)
    _interrupt_on_sigterm()
    app = build_app(loaded, mode=mode, max_upload_mb=max_upload_mb, idle_timeout_s=idle_timeout_s,
                    max_sessions=max_sessions)
    try:
        launch(app, host=host, port=port)
    except KeyboardInterrupt:
        pass  # SIGTERM or Ctrl-C before the server was up: still a clean exit
    finally:
        app.close()
    return 0
