"""Coverage-guided fuzzing of one target of tests/fuzz/targets.py with atheris (libFuzzer).

    python tests/fuzz/fuzz.py TARGET [libFuzzer options] [CORPUS_DIR ...]

e.g. `python tests/fuzz/fuzz.py idx -max_total_time=60 /tmp/idx-corpus tests/fuzz/corpus/idx`
(the first directory receives the new inputs; keep the committed seeds read-only by listing
them second). tests/fuzz/run.sh runs every target this way. A crash (any exception but
CvaeError, or a failed check) stops the run and writes crash-<sha1> with the input: copy it
into tests/fuzz/corpus/TARGET/ and fix the reader; the corpus test then replays it forever.
"""

import os
import sys

import atheris


with atheris.instrument_imports(include=["cvae"]):
    import cvae.checkpoint  # noqa: F401
    import cvae.classifier  # noqa: F401
    import cvae.data  # noqa: F401
    import cvae.images  # noqa: F401
    import cvae.model  # noqa: F401
    import cvae.prior  # noqa: F401
    import cvae.report  # noqa: F401
    import cvae.rundir  # noqa: F401
    import cvae.sheets  # noqa: F401
    import cvae.schedule  # noqa: F401
    import cvae.train  # noqa: F401
    import cvae.train_prior  # noqa: F401

import targets  # this script's own directory is on sys.path


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: fuzz.py TARGET [libFuzzer options]; TARGET one of "
                 f"{', '.join(targets.TARGETS)}")
    name = sys.argv.pop(1)
    check = targets.TARGETS[name]
    mutator = targets.CUSTOM_MUTATORS.get(name)
    if mutator is not None:
        def custom_mutator(data, max_size, seed):
            return mutator(data, max_size, seed, atheris.Mutate)
    else:
        custom_mutator = None
    atheris.Setup(sys.argv, check, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
