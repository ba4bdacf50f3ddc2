"""`sa-engine serve`: the annotation web tool for people (gears 1 and 2) over a store."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.cli.common import (
    config_option,
    fail,
    model_config,
    model_sets,
    open_store,
    sigterm_as_ctrl_c,
)
from engine.cli.gears import (
    CheckpointOpt,
    DeviceOpt,
    ModelOpt,
    RandomOpt,
    RoundOpt,
    SetOpt,
    StoreArg,
    block,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ConfigOpt = config_option("model: and annotate: blocks (and semi: with --stage semi)")


def serve(
    store: StoreArg,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port, printed)")] = 8765,
    host: Annotated[
        str, typer.Option(help="address to bind; the default keeps it on this machine")
    ] = "127.0.0.1",
    token: Annotated[
        Optional[str],
        typer.Option(
            help="a secret every request must carry (the printed address has it); default: a "
            "random one when --host is not loopback, none on loopback"
        ),
    ] = None,
    round_: RoundOpt = 0,
    stage: Annotated[str, typer.Option(help="assisted (gear 1) or semi (gear 2)")] = "assisted",
    config: ConfigOpt = "sa1b",
    set_: SetOpt = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    device: DeviceOpt = None,
    detector: Annotated[
        Optional[Path], typer.Option(help="--stage semi: detector (.pt); default: the round's")
    ] = None,
) -> None:
    """Serve the annotation page for STORE: click points, accept masks, saved to the store.

    Left click adds a positive point, right click a negative one; Enter/a accepts, z/Backspace
    undoes, s skips the mask, n goes to the next image; each mask has annotate.time_limit_s
    (30 s) shown as a countdown. Clicks use the stored embeddings (`sa-engine run assisted
    --annotator none`) or encode an image once when it has none. The model is the config's
    `model:` block (default: the bundled model), or for --round N >= 1 the store's model round N;
    --model / --checkpoint / --device override it.
    With --stage semi (gear 2) each image arrives prefilled with the round's detector masks; the
    person adds what is missing. Bound beyond loopback (--host), the server asks every request
    for a token (--token, else a random one): open the address it prints, which carries it.
    """
    if stage not in ("assisted", "semi"):
        fail(f"--stage '{stage}' is invalid: use assisted or semi")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        fail("--token may hold only letters, digits and . _ ~ - (it travels in an address and a cookie)")
    from engine.annotator import AnnotatorConfig
    from engine.cli.config import load_config

    try:
        settings = load_config(config, model_sets(set_, model, checkpoint, device, store=store, round_=round_))
    except ValueError as exc:
        fail(str(exc))
    cfg = block(settings, "annotate", AnnotatorConfig)
    model_cfg = model_config(settings, random_weights)
    s = open_store(store)
    if not s.shards():
        fail(f"{store} has no images: run `sa-engine ingest PHOTOS --store {store}` first")
    from engine.gears import gear_facts
    from engine.gears.embeddings import load_predictor
    from engine.gears.server import AnnotationSession, make_server

    try:
        predictor = load_predictor(model_cfg)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    meta = gear_facts(model_cfg, cfg)
    prefill = None
    if stage == "semi":  # gear 2: images arrive prefilled by the round's detector
        from engine.gears.semi import SemiConfig, load_or_train, round_detector
        from engine.gears.semi import prefill as semi_prefill

        semi_cfg = block(settings, "semi", SemiConfig)
        try:
            trained = load_or_train(s, predictor, semi_cfg, round_, detector, log=typer.echo)
        except ValueError as exc:
            fail(str(exc))
        prefill = lambda p: semi_prefill(trained, p, semi_cfg)  # noqa: E731
        used = {"path": str(round_detector(s, round_, detector)), "trained_on": trained.trained_on}
        meta = gear_facts(model_cfg, cfg, semi=semi_cfg, detector=used)
    if token is None and host not in LOOPBACK:
        import secrets

        token = secrets.token_urlsafe(24)
    try:
        session = AnnotationSession(s, predictor, round_, cfg.time_limit_s, stage, prefill, meta)
        server = make_server(session, host, port, token or None)
    except (ValueError, OSError) as exc:
        fail(f"cannot serve on {host}:{port}: {exc}")
    bound_host, bound_port = server.server_address[:2]
    if bound_host in ("0.0.0.0", "::"):  # every interface: the name other machines reach it by
        import socket

        bound_host = socket.gethostname()
    address = f"http://{bound_host}:{bound_port}/" + (f"?token={token}" if token else "")
    typer.echo(f"serving {store} on {address} (Ctrl-C stops)", err=False)
    import sys

    sys.stdout.flush()
    try:
        with sigterm_as_ctrl_c():
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        session.close()


def register(app: typer.Typer) -> None:
    app.command(name="serve")(serve)
