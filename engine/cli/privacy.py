from engine.cli.common import placeholder


def register(app):
    placeholder(app, "blur", 6, "blur faces and licence plates in an image or folder")
