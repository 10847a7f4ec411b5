"""Small helpers copying JavaScript semantics, and the other pure
functions the server's answers are made with."""

import base64
import datetime
import hashlib
import re


def js_str(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float):
        if v == int(v):
            return str(int(v))
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join("" if x is None else js_str(x) for x in v)
    if isinstance(v, dict):
        return "[object Object]"
    return str(v)


def js_truthy(v):
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, str):
        return v != ""
    return True


def js_has_length(v):
    return isinstance(v, (str, list)) and len(v) > 0


def js_parse_int(v):
    m = re.match(r"\s*([+-]?\d+)", js_str(v))
    return int(m.group(1)) if m else None


def iso_now():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (
        now.microsecond // 1000)


SLUG_CHAR_MAP = {
    "+": " plus ", "!": " bang ", "@": " at ", "*": " splat ",
    ".": " dot ", ":": "", "~": "", "(": "", ")": "", "'": "", '"': "",
    "|": "", "$": "dollar", "%": "percent", "&": "and", "<": "less",
    ">": "greater",
}


def slugify(text):
    out = []
    for ch in text:
        ch = SLUG_CHAR_MAP.get(ch, ch)
        out.append(re.sub(r"[^A-Za-z0-9_\s$*+~.()'\"!\-:@]+", "", ch))
    s = "".join(out).strip()
    s = re.sub(r"\s+", "-", s)
    return s.lower()


def words(text):
    return len(str(text).split())


def etag_for(body):
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
    return 'W/"%x-%s"' % (len(body), digest)
