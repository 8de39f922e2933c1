"""Every `emo-serve bench` suite (registered in suites.py): decode speed, time to first token,
paging and memory through the Engine (run.py, ``bench decode``), expert paging bandwidth against
the machine's own copy and read bandwidth (paging.py, ``bench cache``), cold arrivals, prefetch
recall and the first-run GPU check.

Nothing is imported here: `emo-serve --help` builds every parser, and the suites' heavy modules
load only when a suite runs.
"""
