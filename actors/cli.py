"""`thinker`: the operator's command line, on the same database, storage and Ray cluster as the server.

    thinker serve [CONFIG]                             `serve run CONFIG`, saying when the models are ready
    thinker status [--address ADDR] [--app NAME]       models, adapters, queues and tenants of a running app
    thinker keys create --tenant NAME [--name LABEL]    issue an API key (printed once)
    thinker keys list [--tenant NAME]                  issued keys: id, tenant, name, prefix, state
    thinker keys revoke KEY_ID                         the key stops working at once
    thinker export tinker://<run>/sampler_weights/<name> OUT_DIR   a checkpoint merged into its base model

`--config` names the Serve config whose `args` locate the database and checkpoint root
(default: ./serve_config.yaml if present, else the built-in defaults); `thinker serve` and
`thinker status` live in actors/service_watch.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from actors import service_watch
from actors.checkpoint_store import parse_tinker_path
from actors.metadata.database import Database, default_url
from actors.metadata.tenants import Tenants
from configs.errors import NotFoundError, ThinkerError
from configs.schema import ThinkerConfig, model_deployment_name

DEFAULT_CONFIG = "serve_config.yaml"


def config_app(path: str | None) -> dict | None:
    """The Thinker application of a Serve config file (default: ./serve_config.yaml if present)."""
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    return None if path is None else service_watch.serve_app(yaml.safe_load(Path(path).read_text()))


def load_config(path: str | None, checkpoint_root: str | None = None) -> ThinkerConfig:
    """The ThinkerConfig in a Serve config file's `args` (or the defaults without a file)."""
    app = config_app(path) or {}
    config = ThinkerConfig.model_validate(app.get("args") or {})
    return config.model_copy(update={"checkpoint_root": checkpoint_root}) if checkpoint_root else config


def app_name(path: str | None) -> str:
    """The name of the application in a Serve config file ("thinker" without one)."""
    app = config_app(path)
    return "thinker" if app is None else app.get("name", "default")


def database(config: ThinkerConfig) -> Database:
    db = Database(config.database_url or default_url(config.cache_dir))
    db.migrate()
    return db


def keys_command(args: argparse.Namespace, config: ThinkerConfig) -> None:
    tenants = Tenants(database(config), config.auth.mode)
    if args.action == "create":
        record, key = tenants.create_key(args.tenant, args.name)
        print(f"key id {record.id} for tenant {record.tenant_id!r} (shown once; store it now):", file=sys.stderr)
        print(key)
    elif args.action == "list":
        for k in tenants.list_keys(args.tenant):
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            print(f"{k.id}\t{k.tenant_id}\t{k.name or '-'}\t{k.prefix}...\t{k.created_at:%Y-%m-%d %H:%M}\t{state}")
    else:
        record = tenants.revoke(args.key_id)
        print(f"revoked key {record.id} of tenant {record.tenant_id!r}", file=sys.stderr)


def export_command(args: argparse.Namespace, config: ThinkerConfig) -> None:
    from actors.hf.export import export  # torch: only for this command
    from actors.metadata.registry import Registry

    row = Registry(database(config)).find_checkpoint(*parse_tinker_path(args.tinker_path))
    if row is None:
        raise NotFoundError(f"no checkpoint {args.tinker_path}")
    out = export(args.tinker_path, args.out_dir, config, row.tenant_id)
    print(f"merged model written to {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="thinker", description="Thinker's operator command line")
    parser.add_argument("--config", default=None, help=f"the Serve config (default: ./{DEFAULT_CONFIG} if present)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the service: `serve run CONFIG`, with a line once it is ready")
    serve.add_argument("serve_config", nargs="?", default=None, help=f"a Serve config (default: ./{DEFAULT_CONFIG})")
    status = commands.add_parser("status", help="what a running app holds: models, adapters, queues, tenants")
    status.add_argument("--address", default="auto", help="the Ray cluster (default: the one running here)")
    status.add_argument("--app", default=None, help="the Serve application (default: the config's one)")
    keys = commands.add_parser("keys", help="API keys (auth.mode: keys)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="issue a key for a tenant (created if new)")
    create.add_argument("--tenant", required=True, help="the tenant's name (letters, digits, '_', '.', '-')")
    create.add_argument("--name", default="", help="a label for the key")
    listing = actions.add_parser("list", help="list issued keys")
    listing.add_argument("--tenant", default=None)
    revoke = actions.add_parser("revoke", help="revoke a key; it stops working at once")
    revoke.add_argument("key_id", type=int)
    export = commands.add_parser("export", help="merge a checkpoint's LoRA into its base model (an HF folder)")
    export.add_argument("tinker_path", help="tinker://<run>/(weights|sampler_weights)/<name>")
    export.add_argument("out_dir")
    export.add_argument("--checkpoint-root", default=None, help="overrides the config's checkpoint_root")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            sys.exit(service_watch.serve_command(args.serve_config or args.config or DEFAULT_CONFIG))
        config = load_config(args.config, getattr(args, "checkpoint_root", None))
        commands = {"keys": keys_command, "export": export_command, "status": status_command}
        commands[args.command](args, config)
    except ThinkerError as exc:
        parser.exit(2, f"thinker: {exc}\n")


def status_command(args: argparse.Namespace, config: ThinkerConfig) -> None:
    app = args.app or app_name(args.config)
    names = {model_deployment_name(i, m): m.name for i, m in enumerate(config.models)}
    print(service_watch.status_report(service_watch.status(args.address, app, database(config), names), app))


if __name__ == "__main__":
    main()
