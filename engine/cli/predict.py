from engine.cli.common import placeholder


def register(app):
    placeholder(app, "predict", 2, "prompt SAM with points/boxes on one image")
