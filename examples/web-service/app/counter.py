"""The counting logic, apart from HTTP and storage: what the unit tests check."""


def normalize(path):
    """The counter a request path counts: /a/b/ and /a//b count as /a/b; / counts as /."""
    parts = [part for part in path.split("?", 1)[0].split("/") if part and part != "."]
    return "/" + "/".join(parts)


def render(path, count):
    return "%s has been visited %d time%s\n" % (path, count, "" if count == 1 else "s")
