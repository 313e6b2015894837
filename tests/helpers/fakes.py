"""Stand-ins for optional clients the tests cannot install."""


class FakeWandb:
    """A stand-in ``wandb`` module recording what the sink sends (the client is an optional extra)."""

    def __init__(self):
        import importlib.machinery

        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found by importlib.util.find_spec
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logs.append((step, dict(data)))

    def finish(self):
        self.finished += 1
