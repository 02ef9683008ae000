"""The secondary: replica store and HTTP replica server.

One directory per volume under the server's ``--root``::

    <name>/replica.json        geometry and the primary's volume id
    <name>/mirror.img          the replica (sparse)
    <name>/manifest/           blake3 per region of mirror.img: an index, groups and the
                               pages written so far (tables.py, format 2)
    <name>/applied.json        mirror watermark + out-of-order applied seqs
    <name>/journal/            applied mirror records (the change-log replica)
    <name>/snapshots/<snap>/   copy-on-write snapshots (preserved regions)
    <name>/overlay.img, overlay/, overlay-applied.json   the overlay replica

This package never imports the primary's volume, engine, agent or replication
code: the secondary only knows records, frames and region arithmetic.
"""
