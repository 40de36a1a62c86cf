"""An HTTP JSON service of top-k recommendations from a trained NeuMF, in the original ids.

    python serve.py --data DIR --load_checkpoint_path model.pth [--movies movies.csv]
                    [--host 127.0.0.1] [--port 8000] [--no_fallback] [--precision auto]

    GET  /recommend?user=ID&k=10       one user's answer
    POST /recommend {"users": [ID, ...], "k": 10}
                                       {"recommendations": [one answer per user, in that order]}
    GET  /health                       {"status": "ok", "users": N, "items": M, ...}

An answer is {"user": ID, "fallback": null, "items": [{"movieId": M, "score": S}, ...]}, best
first, with "title" in each item when --movies is given ("movieId": the name of the item column
convert.py read the ids from, where metadata.json records it). score is the model's sigmoid
output; an item the user rated in training is never among them. A user the data does not hold
gets the most-rated items instead, with "fallback": "popular" and each item's count of training
ratings in place of a score (--no_fallback: 404). k is 1 to 1000 (default 10); fewer items come
back when the user has fewer untrained items. A bad request gets a 4xx status and {"error":
"<what>; <how to fix it>"}; the server goes on serving.

Only the Python standard library serves HTTP: a request costs the model milliseconds and the
server tens of microseconds (README), and the Docker image runs it with nothing more installed.
"""
import collections
import json
import re
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch

import cli
from recommender import Recommender, add_scoring_flags, load_titles, titles_note

PROG = "serve.py"
DEFAULT_TOPK = 10
MAX_TOPK = 1000
MAX_BATCH_USERS = 256
# Longer text is a mistake or an attack, never a user id.
MAX_TEXT_ID = 1024
# 256 ids of 20 digits with separators are about 6 KiB.
MAX_BODY_BYTES = 64 * 1024
# Seconds a POST body has to arrive in, once its headers have: 64 KiB take milliseconds, and a
# client that stops sending holds a connection and a thread until then.
BODY_SECONDS = 5.0
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
# At most 20 characters: int() of a very long digit string costs time quadratic in its length.
# ASCII digits only: int() also reads other scripts' digits, so "١" would be answered as user 1.
WHOLE_NUMBER = re.compile(r"[+-]?\d{1,19}", re.ASCII)
ALLOWED = {"/health": "GET", "/recommend": "GET and POST"}


class RequestError(cli.UserError):
    """A request the service refuses: its HTTP status and a message for the client."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory written by convert.py")
    parser.add_argument("--load_checkpoint_path", required=True,
                        help="model.pth written by ncf.py")
    parser.add_argument("--movies", help="MovieLens titles: movies.csv (movieId,title,...), "
                                          "ml-1m's or ml-10m's movies.dat, or ml-100k's u.item")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 in a "
                             "container)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--no_fallback", action="store_true",
                        help="answer 404 for an unknown user instead of the most-rated items")
    add_scoring_flags(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535, got {args.port}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    return args


def shown(text, limit=40):
    """A client's text quoted in a message, cut short: a 60 KiB id need not come back whole."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def is_number(value):
    """Whether a parsed JSON value is a JSON number: Python's bool is an int, JSON's is not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_shown(value, limit=40):
    """A JSON value as a message names it, its type first, cut short: `the JSON string "1"`."""
    if value is None:
        return "JSON null"
    kind = ("boolean" if isinstance(value, bool) else "number" if is_number(value)
            else "string" if isinstance(value, str) else "array" if isinstance(value, list)
            else "object")
    text = json.dumps(value)
    return f"the JSON {kind} {text if len(text) <= limit else text[:limit] + '...'}"


def whole_number(value, name, low, high, expected):
    """A query parameter's value (from_query: an int where its text spells one), refused unless
    it is an integer in [low, high]."""
    if isinstance(value, int) and low <= value <= high:
        return value
    raise RequestError(HTTPStatus.BAD_REQUEST,
                       f"{name}: expected {expected}, got {shown(str(value))}")


def json_whole_number(value, name, low, high, expected):
    """A value of a JSON body, refused unless it is a JSON number that is an integer in
    [low, high]; the refusal names the JSON type that came and the one expected."""
    if is_number(value) and isinstance(value, int) and low <= value <= high:
        return value
    wanted = expected if is_number(value) else f"a JSON number ({expected})"
    raise RequestError(HTTPStatus.BAD_REQUEST,
                       f"{name}: got {json_shown(value)}, expected {wanted}")


def from_query(text):
    """A query parameter's text as an int when it spells one, else unchanged (to be refused)."""
    return int(text) if WHOLE_NUMBER.fullmatch(text) else text


def is_text_id(value):
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT_ID


def parse_user(value, text_ids=False):
    """The user id of a query, as the data holds them: a 64-bit integer, or with text ids
    (convert.py --string_ids) a non-empty string, taken as given ("007" is not "7")."""
    if not text_ids:
        return whole_number(value, "user", INT64_MIN, INT64_MAX, "a user id (a 64-bit integer)")
    if is_text_id(value):
        return value
    raise RequestError(HTTPStatus.BAD_REQUEST, f"user: expected a user id (text of 1 to "
                                               f"{MAX_TEXT_ID} characters), got {shown(value)}")


def json_user(value, name, text_ids=False):
    """A user id of a JSON body, as parse_user takes them."""
    if not text_ids:
        return json_whole_number(value, name, INT64_MIN, INT64_MAX, "a 64-bit integer user id")
    if is_text_id(value):
        return value
    expected = f"a text user id of 1 to {MAX_TEXT_ID} characters"
    if not isinstance(value, str):
        expected = f"a JSON string ({expected})"
    raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: got {json_shown(value)}, expected "
                                               f"{expected}")


def parse_topk(value, from_json=False):
    """k of a query (from_query) or, from_json, of a JSON body."""
    check = json_whole_number if from_json else whole_number
    return check(value, "k", 1, MAX_TOPK, f"a whole number from 1 to {MAX_TOPK}")


def query_fields(query):
    """{name: text} of /recommend's query string, each of user and k at most once."""
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query),
                          max_num_fields=10)
    except ValueError:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"query {shown(query)}: not name=value pairs joined by &; "
                           f"use /recommend?user=ID&k=10") from None
    unknown = [name for name in fields if name not in ("user", "k")]
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown parameter {shown(unknown[0])}; "
                                                   f"/recommend takes user and k")
    repeated = [name for name, values in fields.items() if len(values) > 1]
    if repeated:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"{repeated[0]}: given {len(fields[repeated[0]])} times; give it "
                           f"once (POST /recommend takes many users)")
    if "user" not in fields:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           "user: missing; use /recommend?user=ID&k=10")
    return {name: values[0] for name, values in fields.items()}


def unique_keys(pairs):
    """A JSON object's dict, refusing a key given twice: json.loads would keep the last silently,
    as the query string's repeated parameters are refused."""
    counts = collections.Counter(key for key, _ in pairs)
    repeated = [key for key, count in counts.items() if count > 1]
    if repeated:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body: key {shown(repeated[0])} given "
                                                   f"{counts[repeated[0]]} times; give it once")
    return dict(pairs)


def batch_request(body, text_ids=False):
    """(user ids, k) of a POST /recommend body."""
    try:
        request = json.loads(body, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           'body: not JSON; send {"users": [ID, ...], "k": 10}') from None
    if not isinstance(request, dict) or not isinstance(request.get("users"), list):
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           'body: expected {"users": [ID, ...], "k": 10} ("k" optional)')
    unknown = [name for name in request if name not in ("users", "k")]
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body: unknown key {shown(unknown[0])}; "
                                                   f"it takes users and k")
    users = request["users"]
    if not 1 <= len(users) <= MAX_BATCH_USERS:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"users: {len(users)} ids, expected 1 to {MAX_BATCH_USERS}; split "
                           f"the batch")
    users = [json_user(user, f"users[{index}]", text_ids) for index, user in enumerate(users)]
    return users, parse_topk(request.get("k", DEFAULT_TOPK), from_json=True)


class Service:
    """The answers, apart from HTTP: original user ids and k in, JSON-ready dicts out."""

    def __init__(self, recommender, titles=None, fallback=True, concurrent_scorings=1):
        self.recommender = recommender
        self.item_ids = recommender.item_ids.tolist()
        # An empty title field reads as NaN, which JSON cannot carry.
        self.titles = None if titles is None else titles.dropna().to_dict()
        self.fallback = fallback
        # More scorings at once than cores only makes each wait longer.
        self.scoring = threading.BoundedSemaphore(concurrent_scorings)

    def health(self):
        return {"status": "ok", "users": len(self.recommender.user_ids),
                "items": len(self.item_ids), "fallback": "popular" if self.fallback else None}

    def recommend(self, users, topk):
        """One answer per original user id, in the order given."""
        dense = [self.recommender.dense_user(user) for user in users]
        unknown = [user for user, index in zip(users, dense) if index is None]
        if unknown and not self.fallback:
            raise RequestError(HTTPStatus.NOT_FOUND,
                               f"user {unknown[0]}: unknown, not among the "
                               f"{len(self.recommender.user_ids)} users of the training data")
        known = [index for index in dense if index is not None]
        if known:
            with self.scoring:
                items, scores = self.recommender.top_items(torch.tensor(known), topk)
            scored = iter(zip(items.tolist(), scores.tolist()))
        answers = []
        for user, index in zip(users, dense):
            if index is None:
                answers.append(self.popular(user, topk))
                continue
            row_items, row_scores = next(scored)
            answers.append({"user": user, "fallback": None, "items": [
                self.item(item, score=round(score, 6))
                for item, score in zip(row_items, row_scores) if item >= 0]})
        return answers

    def popular(self, user, topk):
        items, ratings = self.recommender.popular_items(topk)
        return {"user": user, "fallback": "popular", "items": [
            self.item(item, ratings=count)
            for item, count in zip(items.tolist(), ratings.tolist())]}

    def item(self, dense_item, **value):
        movie = self.item_ids[dense_item]
        entry = {self.recommender.item_column: movie, **value}
        if self.titles is not None:
            entry["title"] = self.titles.get(movie, "")
        return entry


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # What an unparseable request line is answered in: HTTP/0.9, the default, has no status line
    # and no headers, so the client could not tell the error from an answer.
    default_request_version = "HTTP/1.0"
    server_version = "ncf-serve"
    # A client that stops sending its request line or headers is dropped after this many seconds
    # (a body has BODY_SECONDS).
    timeout = 30
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK, 40 ms a response.
    disable_nagle_algorithm = True

    @property
    def text_ids(self):
        return self.server.service.recommender.text_ids

    def route(self):
        method, url = self.command, urlsplit(self.path)
        self.body_read = False
        try:
            if url.path == "/health" and method == "GET":
                payload = self.server.service.health()
            elif url.path == "/recommend" and method == "GET":
                fields = query_fields(url.query)
                user = fields["user"] if self.text_ids else from_query(fields["user"])
                payload = self.server.service.recommend(
                    [parse_user(user, self.text_ids)],
                    parse_topk(from_query(fields.get("k", str(DEFAULT_TOPK)))))[0]
            elif url.path == "/recommend" and method == "POST":
                users, k = batch_request(self.read_body(), self.text_ids)
                payload = {"recommendations": self.server.service.recommend(users, k)}
            elif url.path in ALLOWED:
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED,
                                   f"{url.path}: takes {ALLOWED[url.path]}, not {method}")
            else:
                raise RequestError(HTTPStatus.NOT_FOUND,
                                   f"{shown(url.path)}: no such path; use /recommend or /health")
            status = HTTPStatus.OK
        except RequestError as error:
            status, payload = error.status, {"error": str(error)}
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client went away or stalled mid-body
            return
        except Exception:  # a bug, not the client's fault: log it and keep serving
            traceback.print_exc()
            status, payload = (HTTPStatus.INTERNAL_SERVER_ERROR,
                               {"error": "internal error; see the server's log"})
        if not self.body_read and ("Transfer-Encoding" in self.headers
                                   or self.headers.get("Content-Length", "0") != "0"):
            # An unread body would be taken for the next request on this connection.
            self.close_connection = True
        self.reply(status, payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = route

    def read_body(self):
        """The request's body, whole, or a RequestError (the connection then closes, since the
        rest of the stream cannot be told from the next request)."""
        lengths = self.headers.get_all("Content-Length", [])
        if "Transfer-Encoding" in self.headers or not lengths:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED,
                               "body: send it with a Content-Length header")
        if len(lengths) > 1:
            # Which one a proxy in front of us went by is unknown: the body's end is too.
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"Content-Length: given {len(lengths)} times; send it once")
        length = lengths[0]
        if not re.fullmatch(r"[0-9]+", length):
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"Content-Length: {shown(length)} is not a byte count")
        digits = length.lstrip("0") or "0"
        # Compared as text first: int() of thousands of digits fails, and a count with more
        # digits than the limit is over it.
        if len(digits) > len(str(MAX_BODY_BYTES)) or int(digits) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"Content-Length: {shown(length)}, at most {MAX_BODY_BYTES} "
                               f"bytes are taken; send fewer users a request")
        size = int(digits)
        self.body_read = True
        body = bytearray()
        deadline = time.monotonic() + BODY_SECONDS
        try:
            while len(body) < size:
                # A timeout of 0 would make the socket non-blocking instead.
                self.connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                chunk = self.rfile.read1(size - len(body))
                if not chunk:  # the client ended its side
                    self.close_connection = True
                    raise RequestError(HTTPStatus.BAD_REQUEST,
                                       f"body: {len(body)} of the {size} bytes announced arrived")
                body += chunk
        except TimeoutError:
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT,
                               f"body: {len(body)} of the {size} bytes announced arrived in "
                               f"{BODY_SECONDS:g} s; send the whole body at once") from None
        finally:
            self.connection.settimeout(self.timeout)
        return bytes(body)

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The standard library's answer to a request it cannot parse (a request line over 64
        KiB, too many or too long headers, an unknown method), as JSON like every other error."""
        self.close_connection = True
        phrase = HTTPStatus(code).phrase
        self.reply(code, {"error": f"{message or phrase}; send a well-formed HTTP request such "
                                   f"as GET /recommend?user=ID&k=10"})

    def log_request(self, code="-", size="-"):
        # A line per answered request costs more than serving it; errors are still logged.
        if isinstance(code, int) and code >= 400:
            self.log_message('"%s" %s', self.requestline[:200], code)


class Server(ThreadingHTTPServer):
    """Closing answers the requests being scored, ends idle keep-alive connections, and joins
    every connection's thread: a thread still in torch code while Python finalizes is ended
    mid-C++, and the process aborts ("terminate called without an active exception") instead
    of leaving with 143 on SIGTERM. Close after shutdown(), from another thread than
    serve_forever's."""
    daemon_threads = False
    request_queue_size = 128  # a burst of clients waits in the queue instead of being refused

    def __init__(self, address, service):
        self.service = service
        self.connections = set()
        self.threads = set()
        self.lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address))
        with self.lock:
            self.threads = {known for known in self.threads if known.is_alive()} | {thread}
            self.connections.add(request)
        thread.start()

    def shutdown_request(self, request):
        # Forgotten before it is closed, so server_close never shuts down a reused descriptor.
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        super().server_close()
        with self.lock:
            for connection in self.connections:
                # End-of-file wakes a handler waiting for its next request; one that is
                # scoring still writes its answer, then finds end-of-file.
                try:
                    connection.shutdown(socket.SHUT_RD)
                except OSError:  # the client has gone already
                    pass
            threads = list(self.threads)
        for thread in threads:
            thread.join()

    def handle_error(self, request, client_address):
        # A client that closes its connection while its answer is written is routine.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def listen(host, port, service):
    try:
        return Server((host, port), service)
    except (OSError, OverflowError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise cli.UserError(f"--host {host} --port {port}: cannot listen there ({reason}); "
                            f"pick another --port, or an address of this machine") from None


def main(argv=None):
    args = parse_args(argv)
    titles = load_titles(args.movies) if args.movies else None
    recommender = Recommender(args.data, args.load_checkpoint_path, args.device, args.precision)
    note = titles_note(titles, recommender.item_ids, args.movies)
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)
    concurrent_scorings = 1
    if args.device == "cpu":
        # A request per core, each on one thread, rather than one request at a time on all
        # of them: the same rate on an idle CPU, several times the rate on a busy one, where
        # threads of one product wait on each other (docs: serving figures).
        concurrent_scorings = torch.get_num_threads()
        torch.set_num_threads(1)
    service = Service(recommender, titles, not args.no_fallback, concurrent_scorings)
    server = listen(args.host, args.port, service)
    host, port = server.server_address[:2]
    print(f"{PROG}: {len(recommender.user_ids)} users, {len(recommender.item_ids)} items; "
          f"serving on http://{host}:{port}", flush=True)
    # Ctrl-C and SIGTERM (`docker stop`: as PID 1 a process that does not handle it ignores
    # it) end the wait below through cli.run's one line. Accepting runs in a thread of its own
    # so that they never land inside it, between making a request's thread and starting it.
    accepting = threading.Thread(target=server.serve_forever, name="accepting")
    accepting.start()
    try:
        while accepting.is_alive():
            # Timed: the kernel may hand the signal to another thread, which would not wake
            # an untimed wait of this one.
            accepting.join(timeout=0.5)
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    cli.run(main)
