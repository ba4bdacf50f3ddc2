from engine.cli.common import placeholder


def register(app):
    placeholder(app, "train", 8, "retrain SAM on the masks collected in a store")
    placeholder(app, "evaluate", 8, "gate: compare a candidate model round with the current one")
