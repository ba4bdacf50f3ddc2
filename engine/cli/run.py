from engine.cli.common import placeholder


def register(app):
    placeholder(app, "run", 5, "run a stage (privacy, assisted, semi, auto) over a store's shards on Ray")
