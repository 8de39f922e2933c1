"""Three prompts per domain, written for the shipped-model tests (not taken from the corpus):
Python, C headers, licence text, Debian changelogs, King James prose."""

from __future__ import annotations

DOMAIN_PROMPTS: dict[str, list[str]] = {
    "python": [
        "import os\nimport sys\n\n\ndef read_config(path):\n    \"\"\"Return the settings in path.\"\"\"\n"
        "    with open(path) as handle:\n        return dict(line.split('=', 1) for line in handle)\n\n\n",
        "class Queue:\n    def __init__(self, size):\n        self.items = []\n        self.size = size\n\n"
        "    def push(self, item):\n        if len(self.items) >= self.size:\n"
        "            raise ValueError('full')\n"
        "        self.items.append(item)\n\n    def pop(self):\n",
        "def test_parse_args(self):\n    parser = argparse.ArgumentParser()\n"
        "    parser.add_argument('--name', default=None)\n    args = parser.parse_args(['--name', 'x'])\n"
        "    self.assertEqual(args.name, 'x')\n\n    def test_",
    ],
    "c": [
        "#ifndef _RING_BUFFER_H\n#define _RING_BUFFER_H\n\n#include <stddef.h>\n#include <stdint.h>\n\n"
        "struct ring_buffer {\n\tuint8_t *data;\n\tsize_t head;\n\tsize_t tail;\n};\n\n"
        "extern int ring_init(struct ring_buffer *rb, size_t size);\n",
        "/* Copyright (C) 2019 Free Software Foundation, Inc. */\n#include <sys/types.h>\n\n"
        "typedef struct {\n  int fd;\n  unsigned int flags;\n} handle_t;\n\n"
        "extern ssize_t handle_read (handle_t *__h, void *__buf, size_t __n) __THROW;\n",
        "#define MAX_ENTRIES 64\n#define FLAG_ACTIVE 0x01\n#define FLAG_DIRTY 0x02\n\n"
        "static inline int\nentry_is_active (const struct entry *e)\n{\n"
        "  return (e->flags & FLAG_ACTIVE) != 0;\n}\n\n",
    ],
    "licence": [
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
        "software and associated documentation files (the \"Software\"), to deal in the Software "
        "without restriction, ",
        "This program is free software; you can redistribute it and/or modify it under the terms of the "
        "GNU General Public License as published by the Free Software Foundation; either version 2 of the "
        "License, or (at your option) any later version.\n\n",
        "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING "
        "BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND ",
    ],
    "changelog": [
        "libfoo (1.2.3-1) unstable; urgency=medium\n\n  * New upstream release.\n"
        "  * Bump Standards-Version to 4.6.2, no changes needed.\n\n"
        " -- Jane Doe <jane@debian.org>  Mon, 02 Jan 2023 10:00:00 +0100\n\n",
        "bar-utils (0.9-2) experimental; urgency=low\n\n  * debian/control: add Rules-Requires-Root: no.\n"
        "  * Fix a typo in the package description (Closes: #987654).\n\n"
        " -- John Roe <john@debian.org>  Sat, 14 May 2022 18:30:00 +0000\n\n",
        "zlibx (2.0-1) unstable; urgency=medium\n\n  [ Alex Smith ]\n  * Team upload.\n"
        "  * Update debian/watch to version 4.\n  * Drop obsolete patch applied upstream.\n\n -- ",
    ],
    "prose": [
        "And it came to pass, when the king had heard these words, that he rent his clothes, and put "
        "sackcloth upon his flesh, and fasted, and lay in sackcloth, and went softly.\n",
        "In the beginning was the Word, and the Word was with God, and the Word was God. The same was in "
        "the beginning with God. All things were made by him; and ",
        "Then answered Peter and said unto him, Behold, we have forsaken all, and followed thee; what "
        "shall we have therefore? And Jesus said unto them, Verily I say unto you, ",
    ],
}
