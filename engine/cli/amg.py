from engine.cli.common import placeholder


def register(app):
    placeholder(app, "amg", 3, "automatic mask generation with SA-1B settings")
