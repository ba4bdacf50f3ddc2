from engine.cli.common import placeholder


def register(app):
    placeholder(app, "ingest", 4, "cut a folder/glob/list/URI of images into shards in a store")
    placeholder(app, "status", 4, "progress of every stage and model round in a store")
    placeholder(app, "export", 4, "export a store as SA-1B tar shards or COCO JSON")
    placeholder(app, "verify", 4, "check a release against its checksum list")
