from engine.cli.common import placeholder


def register(app):
    placeholder(app, "serve", 7, "web annotation tool for gears 1 and 2")
