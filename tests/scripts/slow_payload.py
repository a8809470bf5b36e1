"""A value whose pickling takes a given time: put in a checkpoint's ``extra``, it makes the save
that long. It pickles as an empty OrderedDict, so the file still loads weights-only."""
import collections
import time


class Slow:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def __reduce__(self):
        time.sleep(self.seconds)
        return (collections.OrderedDict, ())
