"""serve.py as a client sees it: a real server process on 127.0.0.1 and real HTTP requests."""
import contextlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import bounded_topk
import cli
import recommend
import serve
from conftest import write_clustered_dataset
from recommender import Recommender, load_titles
from test_recommend import ITEM_IDS, TRAIN, USER_IDS, expected_top, model_for, write_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_SECONDS = 120  # torch's import alone can take seconds on a loaded machine


def title(movie):
    dense = ITEM_IDS.index(movie)
    return "" if dense == 9 else f"Film {dense}"


def write_served_data(directory):
    """test_recommend's data: 4 users with original ids USER_IDS, 10 items with ITEM_IDS."""
    data = directory / "data"
    data.mkdir()
    torch.save(torch.tensor(TRAIN), data / "train_ratings.pt")
    torch.save(torch.tensor([(0, 2), (1, 5), (2, 3), (3, 6)]), data / "test_ratings.pt")
    torch.save(torch.zeros(4, 3, dtype=torch.int64), data / "test_negatives.pt")
    torch.save(torch.tensor(USER_IDS), data / "user_ids.pt")
    torch.save(torch.tensor(ITEM_IDS), data / "item_ids.pt")
    torch.save(model_for(4, 10).state_dict(), directory / "model.pth")
    # Film 9 has an empty title field.
    (directory / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f"{movie},{title(movie)},Drama\n" for movie in ITEM_IDS))
    return {"data": str(data), "checkpoint": str(directory / "model.pth"),
            "movies": str(directory / "movies.csv")}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port, method, path, body=None, headers=None):
    """(status, parsed JSON body) of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_exchange(port, data, close_write=True):
    """Send raw bytes (then, by default, end the sending side) and return all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_raw(reply):
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A serve.py process with titles and the popular fallback; stopped whatever happens."""
    files = write_served_data(tmp_path_factory.mktemp("served"))
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "serve.py", "--data", files["data"], "--load_checkpoint_path",
             files["checkpoint"], "--movies", files["movies"], "--port", str(port),
             "--device", "cpu"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None, f"serve.py exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"no /health in {STARTUP_SECONDS} s"
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield {"port": port, "log": log, **files}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def expected_answer(user, k):
    dense = USER_IDS.index(user)
    movies, scores = expected_top(dense, k)
    return movies, scores


def check_answer(answer, user, k):
    movies, scores = expected_answer(user, k)
    assert answer["user"] == user and answer["fallback"] is None
    assert [item["movieId"] for item in answer["items"]] == movies
    assert [item["score"] for item in answer["items"]] == pytest.approx(scores, abs=1e-5)
    assert [item["title"] for item in answer["items"]] == [title(movie) for movie in movies]


def test_health_describes_the_model(server):
    assert request(server["port"], "GET", "/health") == (
        200, {"status": "ok", "users": 4, "items": 10, "fallback": "popular"})


@pytest.mark.parametrize("user", USER_IDS)
def test_top_k_matches_the_plain_forward_without_training_items(server, user):
    status, answer = request(server["port"], "GET", f"/recommend?user={user}&k=3")
    assert status == 200
    check_answer(answer, user, 3)
    trained = {ITEM_IDS[item] for dense, item in TRAIN if USER_IDS[dense] == user}
    assert not trained & {item["movieId"] for item in answer["items"]}


def test_default_k_and_a_user_with_few_untrained_items(server):
    status, answer = request(server["port"], "GET", "/recommend?user=300")
    # 10 by default, but user 300 trained on all items except 0, 1, 2 and 6.
    assert status == 200
    assert sorted(item["movieId"] for item in answer["items"]) == [900, 903, 906, 918]
    check_answer(answer, 300, 4)
    status, answer = request(server["port"], "GET", "/recommend?user=7")
    assert status == 200 and ITEM_IDS[9] in [item["movieId"] for item in answer["items"]]
    check_answer(answer, 7, 8)  # title "" for item 9, whose title field is empty


def test_unknown_user_gets_the_most_rated_items(server):
    status, answer = request(server["port"], "GET", "/recommend?user=-5&k=3")
    # Items 0, 4, 7 and 9 have two training ratings each; ties go to the lower dense id.
    assert status == 200
    assert answer == {"user": -5, "fallback": "popular", "items": [
        {"movieId": 900, "ratings": 2, "title": "Film 0"},
        {"movieId": 912, "ratings": 2, "title": "Film 4"},
        {"movieId": 921, "ratings": 2, "title": "Film 7"}]}


def test_batch_answers_each_user_in_order(server):
    users = [55, 999, 101, 55]
    status, answer = request(server["port"], "POST", "/recommend",
                             json.dumps({"users": users, "k": 2}))
    assert status == 200
    answers = answer["recommendations"]
    assert [entry["user"] for entry in answers] == users
    for entry in answers:
        single = request(server["port"], "GET", f"/recommend?user={entry['user']}&k=2")[1]
        assert entry == single
    check_answer(answers[0], 55, 2)
    assert answers[1]["fallback"] == "popular"


BAD_REQUESTS = [
    # (method, path, body, status, words the error names)
    ("GET", "/recommend", None, 400, "user: missing"),
    ("GET", "/recommend?k=3", None, 400, "user: missing"),
    ("GET", "/recommend?user=", None, 400, "user: expected a user id"),
    ("GET", "/recommend?user=abc", None, 400, "got 'abc'"),
    ("GET", "/recommend?user=1.5", None, 400, "got '1.5'"),
    ("GET", "/recommend?user=0x10", None, 400, "got '0x10'"),
    ("GET", "/recommend?user=%20%2055", None, 400, "user: expected a user id"),
    ("GET", "/recommend?user=9223372036854775808", None, 400, "a 64-bit integer"),
    ("GET", "/recommend?user=" + "7" * 30000, None, 400, "got '7777"),
    ("GET", "/recommend?user=55&k=-1", None, 400, "k: expected a whole number from 1 to 1000"),
    ("GET", "/recommend?user=55&k=0", None, 400, "got '0'"),
    ("GET", "/recommend?user=55&k=1001", None, 400, "got '1001'"),
    ("GET", "/recommend?user=55&k=" + "9" * 40, None, 400, "k: expected"),
    ("GET", "/recommend?user=55&k=ten", None, 400, "got 'ten'"),
    ("GET", "/recommend?user=55&k=1e3", None, 400, "got '1e3'"),
    ("GET", "/recommend?user=55&user=101", None, 400, "user: given 2 times"),
    ("GET", "/recommend?user=55&k=2&k=3", None, 400, "k: given 2 times"),
    ("GET", "/recommend?user=55&top=3", None, 400, "unknown parameter 'top'"),
    ("GET", "/recommend?user=55&k", None, 400, "not name=value pairs"),
    ("GET", "/recommend?" + "&".join(f"user{n}=1" for n in range(20)), None, 400, "query"),
    ("GET", "/recommend?user=" + "1" * 70000, None, 414, "Request-URI Too Long"),
    ("GET", "/recommendations?user=55", None, 404, "no such path"),
    ("GET", "/", None, 404, "no such path"),
    ("DELETE", "/recommend?user=55", None, 405, "takes GET and POST, not DELETE"),
    ("PUT", "/recommend", b"{}", 405, "not PUT"),
    ("POST", "/health", b"{}", 405, "/health: takes GET, not POST"),
    ("POST", "/recommend", b"", 400, "body: not JSON"),
    ("POST", "/recommend", b"users=55", 400, "body: not JSON"),
    ("POST", "/recommend", b"\xff\xfe\x00", 400, "body: not JSON"),
    ("POST", "/recommend", b"[" * 20000, 400, "body: not JSON"),
    ("POST", "/recommend", b"[55]", 400, "expected {\"users\""),
    ("POST", "/recommend", b'{"users": 55}', 400, "expected {\"users\""),
    ("POST", "/recommend", b'{"users": []}', 400, "users: 0 ids, expected 1 to 256"),
    ("POST", "/recommend", json.dumps({"users": [55] * 257}).encode(), 400, "257 ids"),
    ("POST", "/recommend", b'{"users": [55, "101"]}', 400, 'users[1]: got the JSON string "101"'),
    ("POST", "/recommend", b'{"users": [true]}', 400, "users[0]: got the JSON boolean true"),
    ("POST", "/recommend", b'{"users": [55.0]}', 400, "users[0]"),
    ("POST", "/recommend", b'{"users": [null]}', 400, "got JSON null"),
    ("POST", "/recommend", b'{"users": [1e400]}', 400, "users[0]"),
    ("POST", "/recommend", b'{"users": [18446744073709551616]}', 400, "users[0]"),
    ("POST", "/recommend", b'{"users": [55], "k": 0}', 400, "k: got the JSON number 0"),
    ("POST", "/recommend", b'{"users": [55], "k": "3"}', 400, 'k: got the JSON string "3"'),
    ("POST", "/recommend", b'{"users": [55], "k": NaN}', 400, "k: got the JSON number NaN"),
    ("POST", "/recommend", b'{"users": [55], "topk": 3}', 400, "unknown key 'topk'"),
    ("POST", "/recommend", b"x" * (64 * 1024 + 1), 413, "at most 65536"),
]


@pytest.mark.parametrize("method, path, body, status, named", BAD_REQUESTS,
                         ids=[f"{case[0]} {case[1][:40]} {str(case[2])[:20]}"
                              for case in BAD_REQUESTS])
def test_bad_request_is_a_json_4xx_and_the_server_keeps_serving(server, method, path, body,
                                                                status, named):
    got_status, answer = request(server["port"], method, path, body)
    assert got_status == status
    assert list(answer) == ["error"] and named in answer["error"]
    assert len(answer["error"]) < 300  # a long input is not echoed back whole
    check_answer(request(server["port"], "GET", "/recommend?user=55&k=2")[1], 55, 2)


RAW_REQUESTS = [
    # (bytes sent before the client stops sending, status, words the error names)
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
    (b"POST /recommend HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411,
     "Content-Length"),
    (b"POST /recommend HTTP/1.1\r\nContent-Length: -4\r\n\r\n", 400, "not a byte count"),
    (b"POST /recommend HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"users\": [55]}", 400,
     "15 of the 100 bytes"),
    (b"GET /recommend?user=55 HTTP/1.1\r\n" + b"X-Filler: a\r\n" * 200 + b"\r\n", 431,
     "Too many headers"),
    (b"GET /recommend?user=55 HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431,
     "Line too long"),
    (b"GET /recommend?user=55 HTTP/7.0\r\n\r\n", 505, "version"),
    (b"BREW /pot HTTP/1.1\r\n\r\n", 501, "Unsupported method"),
    (b"nonsense\r\n\r\n", 400, "Bad request"),
]


@pytest.mark.parametrize("sent, status, named", RAW_REQUESTS,
                         ids=[case[0][:30].decode() for case in RAW_REQUESTS])
def test_malformed_http_gets_a_json_error(server, sent, status, named):
    got_status, answer = parse_raw(raw_exchange(server["port"], sent))
    assert got_status == status and named in answer["error"]
    assert request(server["port"], "GET", "/health")[0] == 200


def post_head(*header_lines):
    return b"POST /recommend HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in header_lines) \
        + b"\r\n"


EXACT_REFUSALS = [
    # (bytes sent, status, the whole error)
    # Digits of other scripts are not ASCII digits, though int() reads "٥٥" as 55.
    ("GET /recommend?user=%D9%A5%D9%A5 HTTP/1.1\r\n\r\n".encode(), 400,
     "user: expected a user id (a 64-bit integer), got '٥٥'"),
    ("GET /recommend?user=55&k=%EF%BC%92 HTTP/1.1\r\n\r\n".encode(), 400,
     "k: expected a whole number from 1 to 1000, got '２'"),
    # "\xb2" is a digit to str.isdigit (superscript two), not to int().
    (post_head(b"Content-Length: \xb2") + b"{}", 400, "Content-Length: '²' is not a byte count"),
    # int() refuses more than 4,300 digits.
    (post_head(b"Content-Length: " + b"1" * 5000), 413,
     "Content-Length: '" + "1" * 40 + "...', at most 65536 bytes are taken; send fewer users a "
     "request"),
    (post_head(b"Content-Length: " + b"0" * 5000 + b"2") + b"{}", 400,
     'body: expected {"users": [ID, ...], "k": 10} ("k" optional)'),
    # The first count would leave the rest of the body to be read as the next request.
    (post_head(b"Content-Length: 2", b"Content-Length: 15") + b'{"users": [55]}', 400,
     "Content-Length: given 2 times; send it once"),
    (post_head(b"Content-Length: 31") + b'{"users": [55], "users": [101]}', 400,
     "body: key 'users' given 2 times; give it once"),
    (post_head(b"Content-Length: 31") + b'{"users": [55], "k": 2, "k": 3}', 400,
     "body: key 'k' given 2 times; give it once"),
]


@pytest.mark.parametrize("sent, status, error", EXACT_REFUSALS,
                         ids=["arabic-indic user", "fullwidth k", "superscript length",
                              "5000-digit length", "leading zeros", "two lengths",
                              "two users keys", "two k keys"])
def test_odd_ids_lengths_and_keys_are_refused_exactly(server, sent, status, error):
    assert parse_raw(raw_exchange(server["port"], sent)) == (status, {"error": error})
    check_answer(request(server["port"], "GET", "/recommend?user=55&k=2")[1], 55, 2)
    assert "Traceback" not in server["log"].read_text()


def test_clients_that_close_mid_request_do_not_stop_the_server(server):
    port = server["port"]
    for partial in (b"", b"GET /recommend?us", b"GET /recommend?user=55 HTTP/1.1\r\nHost",
                    b"POST /recommend HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"users\""):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(partial)
        # Closed before reading: the answer, if any, meets a reset connection.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /recommend?user=55&k=900 HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    check_answer(request(port, "GET", "/recommend?user=55&k=2")[1], 55, 2)
    log = server["log"].read_text()
    assert "Traceback" not in log


def test_one_connection_carries_many_requests_errors_included(server):
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    try:
        for path, status in (("/recommend?user=55&k=2", 200), ("/recommend?user=x", 400),
                             ("/health", 200), ("/recommend?user=7&k=1", 200)):
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == status
            answer = json.loads(response.read())
        check_answer(answer, 7, 1)
    finally:
        connection.close()


def test_concurrent_clients_get_their_own_answers(server):
    cases = [(USER_IDS[n % 4], 1 + n % 5) for n in range(48)]

    def ask(case):
        user, k = case
        return request(server["port"], "GET", f"/recommend?user={user}&k={k}")[1]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, cases))
    for (user, k), answer in zip(cases, answers):
        check_answer(answer, user, min(k, 4) if user == 300 else k)


@contextlib.contextmanager
def serving(service):
    """serve.py's server of `service` in a thread of this process: its port."""
    server = serve.listen("127.0.0.1", 0, service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_closing_answers_the_request_in_flight_and_joins_every_thread(tmp_path, monkeypatch):
    files = write_served_data(tmp_path)
    service = serve.Service(Recommender(files["data"], files["checkpoint"]),
                            load_titles(files["movies"]))
    scoring, release = threading.Event(), threading.Event()
    recommend_now = service.recommend

    def recommend_later(users, topk):
        scoring.set()
        release.wait(30)
        return recommend_now(users, topk)

    monkeypatch.setattr(service, "recommend", recommend_later)
    server = serve.listen("127.0.0.1", 0, service)
    port = server.server_address[1]
    accepting = threading.Thread(target=server.serve_forever)
    accepting.start()
    # A kept-alive connection, idle: its thread waits Handler.timeout (30 s) for a request.
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        idle.request("GET", "/health")
        assert idle.getresponse().read()
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(request, port, "GET", "/recommend?user=55&k=2")
            assert scoring.wait(30)
            server.shutdown()
            accepting.join()
            closing = threading.Thread(target=server.server_close)
            closing.start()
            release.set()
            closing.join(timeout=10)
            assert not closing.is_alive(), "server_close waits for the idle connection"
            status, answer = in_flight.result()
        # A thread left running would be ended mid-torch when the interpreter finalizes.
        assert len(server.threads) == 2  # the idle connection's and the one in flight
        assert not any(thread.is_alive() for thread in server.threads)
        assert server.connections == set()
    finally:
        release.set()
        idle.close()
    assert status == 200
    check_answer(answer, 55, 2)


def test_sigterm_amid_requests_leaves_with_143_and_one_line(tmp_path):
    files = write_served_data(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "serve.py", "--data", files["data"], "--load_checkpoint_path",
         files["checkpoint"], "--port", "0", "--device", "cpu"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    answered = []

    def ask(port):
        while not stop.is_set():
            try:
                answered.append(request(port, "GET", "/recommend?user=55&k=2")[0])
            except OSError:  # refused or reset once the server stops listening
                pass

    pool = ThreadPoolExecutor(max_workers=4)
    try:
        port = int(process.stdout.readline().rsplit(":", 1)[1])
        for _ in range(4):
            pool.submit(ask, port)
        deadline = time.monotonic() + STARTUP_SECONDS
        while len(answered) < 20:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        # Before this was fixed, 33 of 40 such runs aborted (status -6) as handler threads
        # still in torch met the interpreter's finalization.
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        stop.set()
        pool.shutdown()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, stderr) == (143, "serve.py: terminated (SIGTERM)\n")
    assert set(answered) == {200}


@pytest.fixture
def strict_server(tmp_path):
    """serve.py's server without the fallback, in a thread of this process."""
    files = write_served_data(tmp_path)
    recommender = Recommender(files["data"], files["checkpoint"])
    with serving(serve.Service(recommender, load_titles(files["movies"]), fallback=False)) as port:
        yield port


@pytest.fixture(scope="module")
def local_servers(tmp_path_factory):
    """{"integer": port, "text": port}: servers in this process (so a test can patch serve.py's
    constants) of the served data, with its user ids as integers and as text."""
    with contextlib.ExitStack() as stack:
        ports = {}
        for kind in ("integer", "text"):
            files = write_served_data(tmp_path_factory.mktemp(kind))
            if kind == "text":
                os.remove(os.path.join(files["data"], "user_ids.pt"))
                with open(os.path.join(files["data"], "user_ids.json"), "w") as handle:
                    json.dump([str(user) for user in USER_IDS], handle)
            recommender = Recommender(files["data"], files["checkpoint"])
            service = serve.Service(recommender, load_titles(files["movies"]))
            ports[kind] = stack.enter_context(serving(service))
        yield ports


@pytest.mark.parametrize("ids, body, error", [
    ("integer", {"users": ["1"]},
     'users[0]: got the JSON string "1", expected a JSON number (a 64-bit integer user id)'),
    ("integer", {"users": [55, True]},
     "users[1]: got the JSON boolean true, expected a JSON number (a 64-bit integer user id)"),
    ("integer", {"users": [None]},
     "users[0]: got JSON null, expected a JSON number (a 64-bit integer user id)"),
    ("integer", {"users": [[55]]},
     "users[0]: got the JSON array [55], expected a JSON number (a 64-bit integer user id)"),
    ("integer", {"users": [{"id": 55}]},
     'users[0]: got the JSON object {"id": 55}, expected a JSON number (a 64-bit integer user '
     'id)'),
    ("integer", {"users": ["7" * 100]},
     'users[0]: got the JSON string "' + "7" * 39 + '..., expected a JSON number (a 64-bit '
     'integer user id)'),
    ("integer", {"users": [55.0]},
     "users[0]: got the JSON number 55.0, expected a 64-bit integer user id"),
    ("integer", {"users": [2 ** 64]},
     "users[0]: got the JSON number 18446744073709551616, expected a 64-bit integer user id"),
    ("integer", {"users": [55], "k": "3"},
     'k: got the JSON string "3", expected a JSON number (a whole number from 1 to 1000)'),
    ("integer", {"users": [55], "k": 0},
     "k: got the JSON number 0, expected a whole number from 1 to 1000"),
    ("text", {"users": [196]},
     "users[0]: got the JSON number 196, expected a JSON string (a text user id of 1 to 1024 "
     "characters)"),
    ("text", {"users": ["55", False]},
     "users[1]: got the JSON boolean false, expected a JSON string (a text user id of 1 to 1024 "
     "characters)"),
    ("text", {"users": [""]},
     'users[0]: got the JSON string "", expected a text user id of 1 to 1024 characters'),
])
def test_a_json_value_of_the_wrong_type_is_named_with_the_type_expected(local_servers, ids,
                                                                        body, error):
    port = local_servers[ids]
    assert request(port, "POST", "/recommend", json.dumps(body)) == (400, {"error": error})
    users = [55] if ids == "integer" else ["55"]
    status, answer = request(port, "POST", "/recommend", json.dumps({"users": users, "k": 2}))
    assert status == 200 and answer["recommendations"][0]["user"] == users[0]


def test_a_body_that_stops_arriving_is_answered_408_and_the_connection_closed(local_servers,
                                                                            monkeypatch):
    # Before, nothing came back for Handler.timeout (30 s), then the connection closed.
    monkeypatch.setattr(serve, "BODY_SECONDS", 0.5)
    with socket.create_connection(("127.0.0.1", local_servers["integer"]), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(post_head(b"Content-Length: 100") + b'{"users": [55]}')
        # The client's side stays open: only the server's closing ends this.
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        waited = time.monotonic() - started
    reply = b"".join(chunks)
    assert parse_raw(reply) == (408, {"error": "body: 15 of the 100 bytes announced arrived in "
                                               "0.5 s; send the whole body at once"})
    assert b"Connection: close" in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert 0.5 <= waited < 5
    check_answer(request(local_servers["integer"], "GET", "/recommend?user=55&k=2")[1], 55, 2)


def test_items_are_keyed_by_the_item_column_of_the_converted_ratings(tmp_path):
    files = write_served_data(tmp_path)
    write_metadata(files["data"], user_column="visitor", item_column="product")
    service = serve.Service(Recommender(files["data"], files["checkpoint"]),
                            load_titles(files["movies"]))
    with serving(service) as port:
        status, answer = request(port, "POST", "/recommend",
                                 json.dumps({"users": [55, 999], "k": 2}))
    assert status == 200
    known, unknown = answer["recommendations"]
    movies, scores = expected_answer(55, 2)
    assert known == {"user": 55, "fallback": None, "items": [
        {"product": movie, "score": pytest.approx(score, abs=1e-5), "title": title(movie)}
        for movie, score in zip(movies, scores)]}
    assert unknown == {"user": 999, "fallback": "popular", "items": [
        {"product": 900, "ratings": 2, "title": "Film 0"},
        {"product": 912, "ratings": 2, "title": "Film 4"}]}


def test_no_fallback_answers_404_for_an_unknown_user(strict_server):
    assert request(strict_server, "GET", "/health")[1]["fallback"] is None
    status, answer = request(strict_server, "GET", "/recommend?user=999")
    assert status == 404 and answer["error"].startswith("user 999: unknown")
    status, answer = request(strict_server, "POST", "/recommend",
                             json.dumps({"users": [55, 999]}))
    assert status == 404 and "user 999" in answer["error"]
    check_answer(request(strict_server, "GET", "/recommend?user=55&k=2")[1], 55, 2)


def junk(path):
    path.write_bytes(b"not a checkpoint")
    return path


def one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(serve.main, argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("serve.py: error: ")
    return error


@pytest.mark.parametrize("change, named", [
    (lambda files, tmp: {"data": str(tmp / "nowhere")}, "nowhere"),
    (lambda files, tmp: {"checkpoint": str(tmp / "none.pth")}, "no such checkpoint file"),
    (lambda files, tmp: torch.save(model_for(5, 10).state_dict(), files["checkpoint"]),
     "checkpoint has 5 users and 10 items, data has 4 users"),
    (lambda files, tmp: {"checkpoint": str(junk(tmp / "junk.pth"))},
     "junk.pth: not a PyTorch checkpoint"),
    (lambda files, tmp: os.remove(os.path.join(files["data"], "user_ids.pt")),
     "user_ids.pt: not found"),
    (lambda files, tmp: {"movies": str(tmp / "movies.txt")}, "--movies"),
    (lambda files, tmp: {"port": "70000"}, "--port must be 0 to 65535"),
    (lambda files, tmp: {"port": "eight"}, "--port"),
    (lambda files, tmp: {"host": "no.such.host.invalid"}, "--host no.such.host.invalid"),
])
def test_startup_refusals_are_one_line(tmp_path, capsys, change, named):
    files = write_served_data(tmp_path)
    flags = {"data": files["data"], "checkpoint": files["checkpoint"],
             "movies": files["movies"], "port": "0", "host": "127.0.0.1"}
    flags.update(change(files, tmp_path) or {})
    error = one_error_line(capsys, [
        "--data", flags["data"], "--load_checkpoint_path", flags["checkpoint"], "--movies",
        flags["movies"], "--port", flags["port"], "--host", flags["host"], "--device", "cpu"])
    assert named in error


def test_a_port_in_use_is_refused_in_one_line(tmp_path, capsys):
    files = write_served_data(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = one_error_line(capsys, ["--data", files["data"], "--load_checkpoint_path",
                                        files["checkpoint"], "--port", str(port),
                                        "--device", "cpu"])
    assert f"--port {port}: cannot listen there" in error


def test_bf16_shortlist_gives_the_float32_answers(tmp_path, monkeypatch):
    """300 items: the bfloat16 shortlist (100 items for k <= 25) is a third of them, and the
    items and scores returned are those of the float32 model."""
    # The path where the shortlist serves: bounds that would pay, dropped as they keep items.
    monkeypatch.setattr(bounded_topk, "BOUNDED_MIN_ITEMS", 1)
    monkeypatch.setattr(bounded_topk, "MAX_KEPT_SHARE", 0.0)
    data = write_clustered_dataset(str(tmp_path), nb_users=40, nb_items=300, clusters=4,
                                   per_user=60, negatives=5)
    torch.save(torch.arange(40) + 1000, os.path.join(data, "user_ids.pt"))
    torch.save(torch.arange(300) + 5000, os.path.join(data, "item_ids.pt"))
    checkpoint = str(tmp_path / "model.pth")
    torch.save(model_for(40, 300).state_dict(), checkpoint)
    exact = Recommender(data, checkpoint, precision="fp32")
    shortlisted = Recommender(data, checkpoint, precision="bf16")
    assert exact.shortlist_scorer is None and shortlisted.shortlist_scorer is not None
    assert exact.bounds is None and shortlisted.bounds is None
    users = torch.arange(40)
    for k in (1, 10, 25):
        items, scores = exact.top_items(users, k)
        fast_items, fast_scores = shortlisted.top_items(users, k)
        assert torch.equal(fast_items, items)
        torch.testing.assert_close(fast_scores, scores, rtol=0, atol=1e-6)
    trained = shortlisted.trained.mask(users, 300)
    assert not trained.gather(1, fast_items).any()


@pytest.mark.parametrize("tool", [recommend, serve])
@pytest.mark.parametrize("given, taken", [([], "auto"), (["--precision", "auto"], "auto"),
                                          (["--precision", "bf16"], "bf16"),
                                          (["--precision", "fp32"], "fp32")])
def test_recommend_and_serve_take_the_same_precisions(tool, given, taken):
    argv = ["--data", "d", "--load_checkpoint_path", "m.pth", "--device", "cpu", *given]
    argv += ["--users", "1"] if tool is recommend else []
    assert tool.parse_args(argv).precision == taken


def test_text_user_ids_are_served_as_text(tmp_path):
    """A directory of convert.py --string_ids: users are asked for and answered by their text
    ids, "007" is not "7", and a number is refused instead of being read as text."""
    import convert
    import ncf
    data, run = tmp_path / "data", tmp_path / "run"
    rows = ["user,item,timestamp"] + [f"{user},{item},{time}" for time, (user, item) in enumerate(
        [("007", "tea"), ("7", "cake"), ("007", "cake"), ("7", "tea"), ("007", "jam"),
         ("7", "jam"), ("007", "pie"), ("7", "pie"), ("x", "pie"), ("x", "tea"), ("x", "jam")])]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    assert convert.main(["--path", str(tmp_path / "log.csv"), "--output", str(data),
                         "--first_columns", "--string_ids", "--min_ratings", "1",
                         "--valid_negative", "2"]) == 0
    ncf.main(["--data", str(data), "-e", "1", "-b", "8", "-k", "2", "--checkpoint_dir", str(run),
              "--log_path", str(tmp_path / "log.json")])
    recommender = Recommender(str(data), str(run / "model.pth"))
    server = serve.listen("127.0.0.1", 0, serve.Service(recommender, fallback=False))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        for user in ("007", "7"):
            status, answer = request(port, "GET", f"/recommend?user={user}&k=3")
            trained = {"007": {"tea", "cake", "jam"}, "7": {"cake", "tea", "jam"}}[user]
            assert status == 200 and answer["user"] == user
            assert answer["items"]
            column = recommender.item_column  # "item" where convert.py records the header's
            assert not {entry[column] for entry in answer["items"]} & trained
        status, answer = request(port, "POST", "/recommend", json.dumps({"users": ["x", "007"]}))
        assert status == 200
        assert [entry["user"] for entry in answer["recommendations"]] == ["x", "007"]
        status, answer = request(port, "POST", "/recommend", json.dumps({"users": [7]}))
        assert status == 400 and answer["error"].startswith("users[0]: got the JSON number 7, "
                                                            "expected a JSON string")
        status, answer = request(port, "GET", "/recommend?user=0007")
        assert status == 404 and answer["error"].startswith("user 0007: unknown")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
