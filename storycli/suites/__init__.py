"""Public story benchmarks as commands (`storydiff bench ...`).

`consistory` converts the ConsiStory+ prompt sets (shipped in storycli/data/, MIT) into stories,
generates and scores them per consistency method and writes 1Prompt1Story's Table 1 columns;
`vistorybench` converts ViStoryBench's story.json files into stories and writes the frames in the
folder layout its own scorer reads; `table` formats the results; `common` is the shared loop
(story files, generate, resume records). Nothing here imports the command line.
"""

# The consistency methods a benchmark compares, as `consistency.method` names them.
BENCH_METHODS = ("none", "storydiffusion", "one-prompt")
