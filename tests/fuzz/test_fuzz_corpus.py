"""Every file of the fuzz corpus (tests/fuzz/corpus/<target>/: the seeds, and every input that
ever crashed a reader) through its target's check, under plain pytest: a reader that crashes
on any of them again fails here, without atheris."""

import os

import pytest

from . import targets


def cases():
    for target in targets.TARGETS:
        for path in targets.corpus_files(target):
            yield pytest.param(target, path, id=f"{target}/{os.path.basename(path)}")


@pytest.mark.parametrize("target, path", list(cases()))
def test_corpus_file(target, path):
    with open(path, "rb") as f:
        targets.TARGETS[target](f.read())


def test_every_target_has_seeds_that_it_reads():
    """The seeds must reach the deepest code (a model built, a batch decoded): a check that
    refused its own seeds would pass while testing nothing."""
    targets.STRICT = True
    try:
        for target in targets.TARGETS:
            seeds = [p for p in targets.corpus_files(target)
                     if os.path.basename(p).startswith("seed-")]
            assert seeds, target
            for path in seeds:
                with open(path, "rb") as f:
                    targets.TARGETS[target](f.read())
    finally:
        targets.STRICT = False


def test_a_resealed_checkpoint_with_nan_weights_is_refused_by_the_check():
    """The checkpoint checks really reach the finiteness check (through the resealed digest)."""
    with open(os.path.join(targets.CORPUS, "checkpoint_cvae", "seed-exported"), "rb") as f:
        body = f.read()
    version, header, data_area = targets.split_body(body)
    nan = bytes.fromhex("0000c07f")
    poisoned = targets.join_body(version, header, nan + data_area[4:])
    targets.STRICT = True
    try:
        with pytest.raises(Exception, match="holds nan"):
            targets.check_checkpoint_cvae(poisoned)
    finally:
        targets.STRICT = False
