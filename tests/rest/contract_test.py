#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
# The REST contract test: proto/openapi.yaml against a real qmachined and a real QEMU, over the wire
# with curl. Every documented operation reaches a success status and an error status; every response
# is checked against the document (status, media type, schema, headers); unlisted methods get 405
# with Allow, unlisted paths 404. Prints TAP.
#
# Usage: contract_test.py QMACHINED PROTO_DIR
# Needs Debian's python3-yaml and python3-jsonschema (4.10: RefResolver, no `referencing`) and curl.

import base64
import datetime
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import struct
import urllib.parse

import jsonschema
import yaml

METHODS = ['GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'HEAD', 'OPTIONS']
# Statuses every operation can answer (openapi.yaml's info.description).
GENERIC_STATUSES = {'400', '401', '408', '413', '415', '429', '431', '500', '503'}
SUCCESS = {'200', '201', '204'}
# Operations that succeed by switching protocols (RFC 9110 15.2.2): 101 is their success.
WEBSOCKET_OPERATIONS = {('/v1/machines/{name}/console', 'GET')}
# RFC 6455 1.3: what the server appends to Sec-WebSocket-Key before hashing it.
WEBSOCKET_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
MACHINE_SPEC = {'binary': 'qemu-system-x86_64', 'machine': 'none', 'console': {'enabled': False}}


# ---- TAP ------------------------------------------------------------------------------------------

class Tap:
    def __init__(self):
        self.n = 0
        self.failed = 0

    def result(self, description, problems):
        """One test point: ok when `problems` (a list of strings) is empty."""
        self.n += 1
        if problems:
            self.failed += 1
            print(f'not ok {self.n} - {description}: {problems[0]}')
            for p in problems[1:]:
                print(f'# {p}')
        else:
            print(f'ok {self.n} - {description}')
        sys.stdout.flush()
        return not problems

    def diag(self, text):
        for line in text.splitlines():
            print(f'# {line}')

    def finish(self):
        print(f'1..{self.n}')
        sys.stdout.flush()
        return 1 if self.failed else 0


# ---- the document -------------------------------------------------------------------------------

def json_pointer(doc, pointer):
    node = doc
    if pointer in ('', '/'):
        return node
    for raw in pointer.lstrip('/').split('/'):
        part = urllib.parse.unquote(raw).replace('~1', '/').replace('~0', '~')
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node[part]
    return node


class Contract:
    def __init__(self, proto_dir):
        self.proto_dir = proto_dir
        self.doc_path = os.path.join(proto_dir, 'openapi.yaml')
        with open(self.doc_path, encoding='utf-8') as f:
            self.doc = yaml.safe_load(f)
        with open(os.path.join(proto_dir, 'machine.schema.json'), encoding='utf-8') as f:
            self.machine_schema = json.load(f)
        with open(os.path.join(proto_dir, 'errors.json'), encoding='utf-8') as f:
            self.errors = json.load(f)
        self.base_uri = pathlib.Path(self.doc_path).resolve().as_uri()
        self.machine_schema_uri = urllib.parse.urljoin(self.base_uri, 'machine.schema.json')
        self.resolver = jsonschema.RefResolver(
            base_uri=self.base_uri, referrer=self.doc,
            store={self.machine_schema_uri: self.machine_schema})

    # Every (template, METHOD) with its operation object.
    def operations(self):
        for template, item in self.doc['paths'].items():
            for method, op in item.items():
                if method.upper() in METHODS:
                    yield template, method.upper(), op

    def methods_of(self, template):
        return {m.upper() for m in self.doc['paths'][template] if m.upper() in METHODS}

    def resolve(self, node):
        """Follows a Reference Object ($ref to this document or machine.schema.json)."""
        seen = 0
        while isinstance(node, dict) and '$ref' in node and seen < 20:
            node = self.lookup(node['$ref'])
            seen += 1
        return node

    def lookup(self, ref):
        file_part, _, fragment = ref.partition('#')
        if file_part == '':
            target = self.doc
        elif file_part == 'machine.schema.json':
            target = self.machine_schema
        else:
            path = os.path.join(self.proto_dir, file_part)
            with open(path, encoding='utf-8') as f:
                target = yaml.safe_load(f) if path.endswith(('.yaml', '.yml')) else json.load(f)
        return json_pointer(target, fragment)

    def match(self, path):
        """The document's path template for a request path (raw, before '?'), or None."""
        segments = path.split('/')
        for template in self.doc['paths']:
            parts = template.split('/')
            if len(parts) != len(segments):
                continue
            if all(p == s or (p.startswith('{') and p.endswith('}') and s) for p, s in zip(parts, segments)):
                return template
        return None

    def validate(self, schema, instance):
        validator = jsonschema.Draft202012Validator(schema, resolver=self.resolver)
        out = []
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
            where = '/'.join(str(p) for p in e.absolute_path) or '(root)'
            out.append(f'{where}: {e.message[:300]}')
        return out

    def problem_names(self):
        """name -> http_status for every problem, errc rows and HTTP-only rows."""
        names = {}
        for row in self.errors.get('errors', []) + self.errors.get('http_only', []):
            names[row['name']] = row['http_status']
        return names


def successes(template, method):
    """The statuses that are a success for the operation."""
    if (template, method) in WEBSOCKET_OPERATIONS:
        return SUCCESS | {'101'}
    return SUCCESS


def walk(node, path=''):
    """Yields (json path, value) for every '$ref' in `node`."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == '$ref' and isinstance(v, str):
                yield path, v
            else:
                yield from walk(v, f'{path}/{k}')
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f'{path}/{i}')


def problem_types_of(contract, response):
    """The problem type names a (resolved) response documents in its schema's `type` enum."""
    media = (response.get('content') or {}).get('application/problem+json')
    if not media:
        return None
    schema = media.get('schema', {})
    enum = ((schema.get('properties') or {}).get('type') or {}).get('enum')
    if enum is None:
        return None
    return [t.rsplit(':', 1)[-1] for t in enum]


def static_checks(tap, contract):
    doc = contract.doc
    tap.result('openapi.yaml is OpenAPI 3.1.0 with paths and components',
               [] if doc.get('openapi') == '3.1.0' and doc.get('paths') and doc.get('components')
               else [f"openapi is {doc.get('openapi')!r}, or paths/components missing"])

    problems = []
    for where, ref in walk(doc):
        try:
            contract.lookup(ref)
        except (KeyError, IndexError, ValueError, OSError) as e:
            problems.append(f'{where}: $ref {ref!r} does not resolve ({e!r})')
    for where, ref in walk(contract.machine_schema):
        problems.append(f'machine.schema.json{where}: unexpected $ref {ref!r}')
    tap.result('every $ref resolves', problems)

    problems = []
    ids = {}
    for template, method, op in contract.operations():
        oid = op.get('operationId')
        if not oid:
            problems.append(f'{method} {template}: no operationId')
        elif oid in ids:
            problems.append(f'{method} {template}: operationId {oid} also used by {ids[oid]}')
        else:
            ids[oid] = f'{method} {template}'
        if not op.get('description') or not op.get('summary'):
            problems.append(f'{method} {template}: no summary or description')
    tap.result(f'every operation ({len(ids)}) has a unique operationId, a summary and a description',
               problems)

    problems = []
    for template, method, op in contract.operations():
        codes = set(op.get('responses', {}))
        if not any(c.startswith('4') for c in codes):
            problems.append(f'{method} {template}: no 4xx response')
        if not codes & successes(template, method):
            problems.append(f'{method} {template}: no success response')
        missing = GENERIC_STATUSES - codes
        if missing:
            problems.append(f'{method} {template}: lacks the generic statuses {sorted(missing)}')
        for code in codes:
            if not code.isdigit():
                problems.append(f'{method} {template}: response code {code!r} is not a status')
    tap.result('every operation documents a success, at least one 4xx and the generic statuses',
               problems)

    problems = []
    for template, method, op in contract.operations():
        item = doc['paths'][template]
        params = [contract.resolve(p) for p in item.get('parameters', []) + op.get('parameters', [])]
        declared = {p['name'] for p in params if p.get('in') == 'path'}
        used = {s[1:-1] for s in template.split('/') if s.startswith('{')}
        if declared != used:
            problems.append(f'{method} {template}: path parameters {sorted(declared)} != {sorted(used)}')
        for p in params:
            if p.get('in') == 'path' and not p.get('required'):
                problems.append(f'{method} {template}: path parameter {p["name"]} is not required')
            if not p.get('description'):
                problems.append(f'{method} {template}: parameter {p["name"]} has no description')
    tap.result('path templates and path parameters agree', problems)

    problems = []
    for template, method, op in contract.operations():
        body = contract.resolve(op.get('requestBody'))
        if body is None:
            if method in ('POST', 'PUT'):
                problems.append(f'{method} {template}: no requestBody')
            continue
        for media, content in body.get('content', {}).items():
            if media != 'application/json':
                problems.append(f'{method} {template}: request media type {media}')
            schema = contract.resolve(content.get('schema'))
            if not isinstance(schema, dict) or schema.get('type') != 'object' \
                    or schema.get('additionalProperties') is not False:
                problems.append(f'{method} {template}: request schema is not a closed object')
    tap.result('every request body is a JSON object with additionalProperties: false', problems)

    problems = []
    for name, schema in doc['components']['schemas'].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.exceptions.SchemaError as e:
            problems.append(f'components/schemas/{name}: {e.message}')
    try:
        jsonschema.Draft4Validator.check_schema(contract.machine_schema)
    except jsonschema.exceptions.SchemaError as e:
        problems.append(f'machine.schema.json: {e.message}')
    if 'nullable' in json.dumps(doc):
        problems.append('uses "nullable" (OpenAPI 3.0); write type: [T, "null"]')
    tap.result('the schemas are valid JSON Schema (2020-12; machine.schema.json draft-04)', problems)

    problems = []
    names = contract.problem_names()
    errc_keys = {'errc', 'name', 'http_status', 'title', 'type', 'dbus', 'description'}
    for row in contract.errors.get('errors', []):
        if set(row) != errc_keys:
            problems.append(f'errors.json row {row.get("name")}: keys {sorted(row)}')
    for row in contract.errors.get('http_only', []):
        if set(row) != errc_keys - {'errc', 'dbus'}:
            problems.append(f'errors.json http_only row {row.get("name")}: keys {sorted(row)}')
        if row.get('type') != f'urn:qmachined:error:{row.get("name")}':
            problems.append(f'errors.json http_only row {row.get("name")}: type {row.get("type")}')
    want_http_only = {'Unauthorized': 401, 'NotFound': 404, 'MethodNotAllowed': 405,
                      'RequestTimeout': 408, 'PayloadTooLarge': 413,
                      'UnsupportedMediaType': 415, 'UpgradeRequired': 426,
                      'HeaderFieldsTooLarge': 431}
    got_http_only = {r['name']: r['http_status'] for r in contract.errors.get('http_only', [])}
    if got_http_only != want_http_only:
        problems.append(f'errors.json http_only is {got_http_only}')
    documented = []
    for template, method, op in contract.operations():
        for code, response in op['responses'].items():
            documented.append((f'{method} {template} {code}', code, contract.resolve(response)))
    for name, response in doc['components']['responses'].items():
        documented.append((f'components/responses/{name}', None, response))
    for where, code, response in documented:
        types = problem_types_of(contract, response)
        if 'application/problem+json' in (response.get('content') or {}) and types is None:
            problems.append(f'{where}: a problem response without a type enum')
        for t in types or []:
            if t not in names:
                problems.append(f'{where}: problem {t} is not in errors.json')
            elif code is not None and str(names[t]) != code:
                problems.append(f'{where}: problem {t} has status {names[t]} in errors.json')
    tap.result('every documented problem type is in errors.json with the same status', problems)

    # docs/rest.md, the readable reference: its table of routes lists exactly the document's
    # operations, each with a success status the document gives it.
    problems = []
    rest_md = os.path.join(contract.proto_dir, '..', 'docs', 'rest.md')
    try:
        with open(rest_md, encoding='utf-8') as f:
            text = f.read()
    except OSError as e:
        text = ''
        problems.append(str(e))
    table = text.partition('\n## Routes\n')[2].partition('\n## ')[0]
    rows = re.findall(r'^\| (GET|POST|PUT|DELETE) \| `([^`]+)` \| (\d{3})', table, re.M)
    listed = {(method, path): code for method, path, code in rows}
    for template, method, op in contract.operations():
        code = listed.pop((method, template), None)
        if code is None:
            problems.append(f'{method} {template} is not in docs/rest.md\'s table of routes')
        elif code not in op['responses'] or code not in successes(template, method):
            problems.append(f'docs/rest.md gives {method} {template} {code}, not a success the document lists')
    for (method, path) in listed:
        problems.append(f'docs/rest.md lists {method} {path}, which the document does not have')
    if len(rows) != len(set((m, p) for m, p, _ in rows)):
        problems.append('docs/rest.md lists a route twice')
    tap.result('docs/rest.md\'s table of routes is the document\'s operations', problems)


# ---- HTTP over curl -----------------------------------------------------------------------------

class Response:
    def __init__(self, method, target, status, headers, body, error):
        self.method = method
        self.target = target
        self.status = status  # int; 0 when no answer
        self.headers = headers  # lower-case name -> value
        self.body = body
        self.error = error  # curl's complaint, when it had one

    def json(self):
        return json.loads(self.body.decode('utf-8'))

    def media_type(self):
        return self.headers.get('content-type', '').split(';')[0].strip().lower()


class Client:
    def __init__(self, workdir, socket_path=None, base_url='http://localhost'):
        self.workdir = workdir
        self.socket_path = socket_path
        self.base_url = base_url
        self.count = 0

    def request(self, method, target, body=None, content_type='application/json', headers=(),
                stream_s=None):
        """`stream_s`: the answer is a stream; read it for that long (curl's timeout then ends it)."""
        self.count += 1
        hdr_file = os.path.join(self.workdir, 'h')
        body_file = os.path.join(self.workdir, 'b')
        for f in (hdr_file, body_file):
            if os.path.exists(f):
                os.unlink(f)
        argv = ['curl', '-sS', '--path-as-is', '--max-time', str(stream_s or 90), '-D', hdr_file,
                '-w', '%{http_code}', '-H', 'Expect:']
        if self.socket_path:
            argv += ['--unix-socket', self.socket_path]
        if method == 'HEAD':
            # --head: curl reads no body (it writes the header to -o, so that goes nowhere).
            argv += ['--head', '-o', os.devnull]
        else:
            argv += ['-X', method, '-o', body_file]
        for h in headers:
            argv += ['-H', h]
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            argv += ['--data-binary', '@-']
            argv += ['-H', f'Content-Type: {content_type}' if content_type else 'Content-Type:']
        argv.append(self.base_url + target)
        proc = subprocess.run(argv, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              check=False)
        code = proc.stdout.decode(errors='replace').strip()
        status = int(code) if code.isdigit() else 0
        headers_out = {}
        if os.path.exists(hdr_file):
            with open(hdr_file, 'rb') as f:
                raw = f.read().decode('latin-1')
            blocks = [b for b in raw.replace('\r\n', '\n').split('\n\n') if b.startswith('HTTP/')]
            if blocks:
                for line in blocks[-1].split('\n')[1:]:
                    if ':' in line:
                        k, _, v = line.partition(':')
                        k = k.strip().lower()
                        v = v.strip()
                        headers_out[k] = f'{headers_out[k]}, {v}' if k in headers_out else v
        body_out = b''
        if os.path.exists(body_file):
            with open(body_file, 'rb') as f:
                body_out = f.read()
        # curl's 28: the stream was read for stream_s seconds, as asked.
        ended = proc.returncode == 0 or (stream_s and proc.returncode == 28)
        error = '' if ended else proc.stderr.decode(errors='replace').strip()
        return Response(method, target, status, headers_out, body_out, error)


def websocket_handshake(socket_path, target, timeout_s=10):
    """Opens a WebSocket to `target` by hand (RFC 6455 4.1; python has no client): the answer's
    Response, the Sec-WebSocket-Key sent, the socket and the bytes read past the answer's header."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(socket_path)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f'GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n'
                      f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n'
                      'Sec-WebSocket-Version: 13\r\n\r\n').encode())
        data = recv_until(sock, b'\r\n\r\n')
    except OSError:
        sock.close()
        raise
    status, headers, rest = parse_answer(data)
    return Response('GET', target, status, headers, b'', ''), key, sock, rest


def recv_until(sock, marker):
    """What `sock` sends until `marker` is in it (or the peer closes)."""
    data = b''
    while marker not in data:
        more = sock.recv(4096)
        if not more:
            break
        data += more
    return data


def parse_answer(data):
    """An HTTP/1.1 answer's bytes: (status, lower-case headers, the bytes after the header);
    status 0 when there is no status line."""
    head, _, rest = data.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status_line = lines[0].split(' ')
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(':')
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def read_frame(sock, rest):
    """One unmasked frame from the server (RFC 6455 5.2): (opcode, payload, bytes left over)."""
    buf = rest

    def need(n):
        nonlocal buf
        while len(buf) < n:
            more = sock.recv(4096)
            if not more:
                raise EOFError('the server closed the connection')
            buf += more
        out, buf = buf[:n], buf[n:]
        return out
    first, second = need(2)
    length = second & 0x7f
    if length == 126:
        length = struct.unpack('>H', need(2))[0]
    elif length == 127:
        length = struct.unpack('>Q', need(8))[0]
    payload = need(length)
    return first & 0x0f, payload, buf


def check_against(contract, response_obj, r):
    """What is wrong with response `r` against the (resolved) Response Object `response_obj`."""
    problems = []
    content = response_obj.get('content') or {}
    if not content:
        if r.body:
            problems.append(f'expected no body, got {len(r.body)} bytes')
    else:
        media = r.media_type()
        if media not in content:
            problems.append(f'Content-Type {r.headers.get("content-type")!r}, documented {sorted(content)}')
        elif r.method == 'HEAD' and not r.body:
            pass
        elif media in ('application/json', 'application/problem+json'):
            try:
                value = r.json()
            except ValueError as e:
                problems.append(f'body is not JSON ({e}): {r.body[:200]!r}')
            else:
                schema = content[media].get('schema', {})
                problems += [f'body {p}' for p in contract.validate(schema, value)]
                if media == 'application/problem+json' and isinstance(value, dict) \
                        and value.get('status') != r.status:
                    problems.append(f'problem status {value.get("status")} != HTTP {r.status}')
        elif media == 'text/event-stream':
            if not r.body.startswith(b': subscribed\n\n'):
                problems.append(f'the stream does not start with ": subscribed": {r.body[:100]!r}')
        elif media == 'text/plain':
            charset = r.headers.get('content-type', '').lower()
            if 'charset=utf-8' not in charset.replace(' ', ''):
                problems.append(f'text without charset=utf-8: {r.headers.get("content-type")!r}')
    for name, header in (response_obj.get('headers') or {}).items():
        header = contract.resolve(header)
        value = r.headers.get(name.lower())
        if value is None:
            if header.get('required'):
                problems.append(f'header {name} missing')
            continue
        problems += [f'header {name} {p}' for p in contract.validate(header.get('schema', {}), value)]
    return problems


class Session:
    """Sends requests, checks each against the contract and records which statuses each operation reached."""

    def __init__(self, tap, contract, client):
        self.tap = tap
        self.contract = contract
        self.client = client
        self.reached = {}  # (template, METHOD) -> set of status strings
        self.last_seq = 0

    def send(self, description, method, target, expect, body=None, content_type='application/json',
             headers=(), check=None, stream_s=None):
        """One test point: the request answers `expect` and the answer fits the document; `check`
        (response, value) returns more problems. Returns (response, parsed JSON or None)."""
        r = self.client.request(method, target, body, content_type, headers, stream_s)
        problems = []
        value = None
        if r.status == 0:
            problems.append(f'no answer: {r.error}')
        elif r.status != expect:
            problems.append(f'got {r.status}, expected {expect}: {r.body[:300]!r}')
        if r.status:
            path = target.split('?')[0]
            template = self.contract.match(path)
            if template is None:
                response_obj = self.contract.doc['components']['responses']['NoSuchRoute']
                if r.status != 404:
                    problems.append(f'an unlisted path answered {r.status}')
            elif method not in self.contract.methods_of(template):
                response_obj = self.contract.doc['components']['responses']['MethodNotAllowed']
                if r.status != 405:
                    problems.append(f'an unlisted method answered {r.status}')
            else:
                op = self.contract.doc['paths'][template][method.lower()]
                self.reached.setdefault((template, method), set()).add(str(r.status))
                response_obj = op['responses'].get(str(r.status))
                if response_obj is None:
                    problems.append(f'status {r.status} is not documented for {method} {template}')
            if response_obj is not None:
                problems += check_against(self.contract, self.contract.resolve(response_obj), r)
            if r.media_type() in ('application/json', 'application/problem+json') and r.body:
                try:
                    value = r.json()
                except ValueError:
                    value = None
            if isinstance(value, dict) and isinstance(value.get('event_seq'), int):
                if value['event_seq'] < self.last_seq:
                    problems.append(f'event_seq went back from {self.last_seq} to {value["event_seq"]}')
                self.last_seq = max(self.last_seq, value['event_seq'])
            if check and not problems:
                try:
                    problems += check(r, value)
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    problems.append(f'unexpected answer ({e!r}): {r.body[:300]!r}')
        self.tap.result(f'{method} {target[:80]} -> {expect} ({description})', problems)
        return r, value


    def websocket(self, description, target, check=None):
        """One test point: a WebSocket handshake by hand answers 101 as the document says, with the
        Sec-WebSocket-Accept of RFC 6455 4.2.2; `check` (response, socket, bytes read past the
        answer) returns more problems while the WebSocket is open."""
        problems = []
        try:
            r, key, sock, rest = websocket_handshake(self.client.socket_path, target)
        except OSError as e:
            self.tap.result(f'GET {target[:80]} -> 101 ({description})', [f'no answer: {e!r}'])
            return
        with sock:
            template = self.contract.match(target.split('?')[0])
            op = self.contract.doc['paths'][template]['get']
            self.reached.setdefault((template, 'GET'), set()).add(str(r.status))
            if r.status != 101:
                problems.append(f'got {r.status}, expected 101')
            else:
                problems += check_against(self.contract, self.contract.resolve(op['responses']['101']), r)
                want = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()
                if r.headers.get('sec-websocket-accept') != want:
                    problems.append(f'Sec-WebSocket-Accept {r.headers.get("sec-websocket-accept")!r}, '
                                    f'expected {want!r}')
            if check and not problems:
                try:
                    problems += check(r, sock, rest)
                except (OSError, EOFError, ValueError, struct.error) as e:
                    problems.append(f'the WebSocket failed: {e!r}')
        self.tap.result(f'GET {target[:80]} -> 101 ({description})', problems)


# Checks of the answers' meaning, beyond their shape.

def machine_is(state, **more):
    def check(r, m):
        problems = []
        if m.get('state') != state:
            problems.append(f'state {m.get("state")}, expected {state}')
        for key, want in more.items():
            got = m.get(key)
            if callable(want):
                if not want(got):
                    problems.append(f'{key} is {got!r}')
            elif got != want:
                problems.append(f'{key} is {got!r}, expected {want!r}')
        has_process = state in ('starting', 'running', 'paused', 'stopping', 'unresponsive')
        if has_process != isinstance(m.get('pid'), int):
            problems.append(f'pid {m.get("pid")!r} in state {state}')
        us = m.get('state_since_us')
        if isinstance(us, int):
            when = datetime.datetime.fromtimestamp(us // 1000000, datetime.timezone.utc)
            text = when.strftime('%Y-%m-%dT%H:%M:%S') + f'.{us % 1000000:06d}Z'
            if m.get('state_since') != text:
                problems.append(f'state_since {m.get("state_since")!r} is not state_since_us {us} ({text})')
        etag = r.headers.get('etag')
        if etag is not None and etag != f'"{m.get("generation")}"':
            problems.append(f'ETag {etag} but generation {m.get("generation")}')
        return problems
    return check


def stop_reason(kind):
    return lambda got: isinstance(got, dict) and got.get('kind') == kind


def problem_is(name, field=None, more=None):
    def check(r, p):
        problems = []
        if p.get('type') != f'urn:qmachined:error:{name}':
            problems.append(f'type {p.get("type")}, expected {name}')
        if field is not None:
            got = p.get('field')
            ok = field(got) if callable(field) else got == field
            if not ok:
                problems.append(f'field {got!r}, expected {field!r}')
        if more:
            problems += more(p)
        return problems
    return check


# The Prometheus text exposition format 0.0.4: its media type names the version, which the
# document's `text/plain` key leaves out (check_against compares the type and the charset only).
METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
METRIC_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)'
                           r'(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
                           r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\})?'
                           r' (\+Inf|-Inf|NaN|[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)')


def metrics_text(r, value):
    """GET /metrics: the format's content type; every line a HELP, a TYPE or a sample, every sample
    of a qmachined_ family that has its HELP and TYPE before it (tests/rest/exposition.hpp, used by
    rest_test, reads it strictly)."""
    problems = []
    if r.headers.get('content-type') != METRICS_CONTENT_TYPE:
        problems.append(f'Content-Type {r.headers.get("content-type")!r}, expected {METRICS_CONTENT_TYPE!r}')
    helped, typed = set(), {}
    text = r.body.decode('utf-8')
    if not text.endswith('\n'):
        problems.append('the text does not end with a newline')
    for line in text.splitlines():
        if line.startswith('# HELP '):
            helped.add(line.split(' ')[2])
        elif line.startswith('# TYPE '):
            _, _, name, kind = line.split(' ', 3)
            typed[name] = kind
        else:
            m = METRIC_SAMPLE.fullmatch(line)
            if not m:
                problems.append(f'not a sample: {line[:200]!r}')
                continue
            name = m.group(1)
            family = next((name[:-len(sfx)] for sfx in ('_bucket', '_sum', '_count')
                           if name.endswith(sfx) and typed.get(name[:-len(sfx)]) == 'histogram'), name)
            if not family.startswith('qmachined_') or family not in helped or family not in typed:
                problems.append(f'{name}: its family has no HELP or TYPE before it, or is not qmachined_')
    return problems


def run_requests(contract, s):
    # The daemon.
    s.send('versions', 'GET', '/v1/version', 200,
           check=lambda r, v: [] if v['api'] == 'v1' else [f'api {v["api"]}'])
    s.send('metrics', 'GET', '/metrics', 200, check=metrics_text)
    s.send('unknown query parameter', 'GET', '/metrics?x=1', 400,
           check=problem_is('InvalidArgument', 'x'))
    s.send('health', 'GET', '/v1/health', 200,
           check=lambda r, v: [] if v['machines'] == 0 else [f'{v["machines"]} machines'])
    s.send('unknown query parameter', 'GET', '/v1/version?frob=1', 400,
           check=problem_is('InvalidArgument', 'frob'))
    s.send('unknown query parameter', 'GET', '/v1/health?verbose=1', 400,
           check=problem_is('InvalidArgument', 'verbose'))
    s.send('header over 16 KiB', 'GET', '/v1/version', 431, headers=['X-Flood: ' + 'a' * 20000],
           check=problem_is('HeaderFieldsTooLarge'))
    s.send('no machines yet', 'GET', '/v1/machines', 200,
           check=lambda r, v: [] if v == {'machines': []} else [f'{v}'])
    s.send('unknown query parameter', 'GET', '/v1/machines?all=1', 400,
           check=problem_is('InvalidArgument', 'all'))

    # Create.
    s.send('create c1', 'POST', '/v1/machines', 201, {'name': 'c1', 'spec': MACHINE_SPEC},
           check=lambda r, m: machine_is('defined', generation=1, name='c1', pid=None,
                                         stop_reason=None, operation=None)(r, m)
           + ([] if r.headers.get('location') == '/v1/machines/c1'
              else [f'Location {r.headers.get("location")!r}'])
           + ([] if m['spec']['machine'] == 'none' and m['spec']['cpus'] == 1
              and m['uuid'] == m['spec'].get('uuid') else [f'spec {m["spec"]}']))
    s.send('existing name', 'POST', '/v1/machines', 409, {'name': 'c1', 'spec': MACHINE_SPEC},
           check=problem_is('Exists'))
    s.send('wrong type in the spec', 'POST', '/v1/machines', 400,
           {'name': 'c2', 'spec': {'cpus': 'two'}}, check=problem_is('InvalidArgument', 'spec.cpus'))
    s.send('unknown field in the spec', 'POST', '/v1/machines', 400,
           {'name': 'c2', 'spec': {'console': {'frob': 1}}},
           check=problem_is('InvalidArgument', 'spec.console.frob'))
    s.send('unknown member', 'POST', '/v1/machines', 400, {'name': 'c2', 'frob': 1},
           check=problem_is('InvalidArgument', 'frob'))
    s.send('missing name', 'POST', '/v1/machines', 400, {'spec': {}},
           check=problem_is('InvalidArgument', 'name'))
    s.send('bad name', 'POST', '/v1/machines', 400, {'name': 'a/b'},
           check=problem_is('InvalidArgument', 'name'))
    s.send('malformed JSON', 'POST', '/v1/machines', 400, b'{"name": ',
           check=problem_is('InvalidArgument'))
    s.send('body not an object', 'POST', '/v1/machines', 400, b'["c2"]',
           check=problem_is('InvalidArgument'))
    s.send('body not JSON', 'POST', '/v1/machines', 415, b'name=c2', content_type='text/plain',
           check=problem_is('UnsupportedMediaType'))
    s.send('body without Content-Type', 'POST', '/v1/machines', 415, b'{"name": "c2"}',
           content_type=None, check=problem_is('UnsupportedMediaType'))
    big = b'{"name": "c2", "spec": {"args": ["' + b'x' * (2 * 1024 * 1024) + b'"]}}'
    s.send('2 MiB body', 'POST', '/v1/machines', 413, big, check=problem_is('PayloadTooLarge'))
    s.send('create c2 without a spec', 'POST', '/v1/machines', 201, {'name': 'c2'},
           content_type='application/json; charset=utf-8',
           check=lambda r, m: machine_is('defined', generation=1)(r, m)
           + ([] if m['spec']['binary'] == 'qemu-system-x86_64' else [f'spec {m["spec"]}']))

    # Read.
    s.send('inspect', 'GET', '/v1/machines/c1', 200, check=machine_is('defined', generation=1))
    s.send('unknown machine', 'GET', '/v1/machines/nope', 404, check=problem_is('NoSuchMachine'))
    s.send('name with %2F', 'GET', '/v1/machines/a%2Fb', 400, check=problem_is('InvalidArgument', 'name'))
    s.send('name %2e%2e', 'GET', '/v1/machines/%2e%2e', 400, check=problem_is('InvalidArgument', 'name'))
    s.send('name of 65 characters', 'GET', '/v1/machines/' + 'a' * 65, 400,
           check=problem_is('InvalidArgument', 'name'))
    s.send('two machines, sorted', 'GET', '/v1/machines', 200,
           check=lambda r, v: [] if [m['name'] for m in v['machines']] == ['c1', 'c2']
           else [f'{[m["name"] for m in v["machines"]]}'])

    # Delete (c2: no process, no force needed).
    s.send('bad force', 'DELETE', '/v1/machines/c2?force=maybe', 400,
           check=problem_is('InvalidArgument', 'force'))
    s.send('delete c2', 'DELETE', '/v1/machines/c2', 204)
    s.send('deleted', 'GET', '/v1/machines/c2', 404, check=problem_is('NoSuchMachine'))
    s.send('unknown machine', 'DELETE', '/v1/machines/c2', 404, check=problem_is('NoSuchMachine'))

    # Actions that need a process, on a defined machine.
    s.send('pause without a process', 'POST', '/v1/machines/c1/pause', 409, check=problem_is('StateConflict'))
    s.send('resume without a process', 'POST', '/v1/machines/c1/resume', 409,
           check=problem_is('StateConflict'))
    s.send('qmp without a process', 'POST', '/v1/machines/c1/qmp', 409, {'execute': 'query-status'},
           check=problem_is('StateConflict'))
    s.send('stop without a process: nothing to do', 'POST', '/v1/machines/c1/stop', 200,
           check=machine_is('defined'))
    s.send('unknown option', 'POST', '/v1/machines/c1/start', 400, {'x': 1},
           check=problem_is('InvalidArgument', 'x'))
    s.send('body not JSON', 'POST', '/v1/machines/c1/start', 415, b'go', content_type='text/plain',
           check=problem_is('UnsupportedMediaType'))

    # Start, QMP, pause, resume, stop.
    s.send('start', 'POST', '/v1/machines/c1/start', 200, check=machine_is('running', qemu_status='running'))
    s.send('start a running machine: nothing to do', 'POST', '/v1/machines/c1/start', 200, {},
           check=machine_is('running'))
    s.send('update while running', 'PUT', '/v1/machines/c1/spec', 409, MACHINE_SPEC,
           check=problem_is('StateConflict'))
    s.send('delete while running', 'DELETE', '/v1/machines/c1', 409, check=problem_is('StateConflict'))
    s.send('delete while running, force=false', 'DELETE', '/v1/machines/c1?force=false', 409,
           check=problem_is('StateConflict'))
    s.send('query-status', 'POST', '/v1/machines/c1/qmp', 200, {'execute': 'query-status'},
           check=lambda r, v: [] if v['return'].get('status') == 'running' else [f'{v}'])
    s.send('with arguments and a timeout', 'POST', '/v1/machines/c1/qmp', 200,
           {'execute': 'query-commands', 'arguments': {}, 'timeout_s': 5.5},
           check=lambda r, v: [] if isinstance(v['return'], list) else [f'{v}'])
    s.send('QEMU refuses', 'POST', '/v1/machines/c1/qmp', 422, {'execute': 'no-such-command'},
           check=problem_is('QmpError', more=lambda p: [] if p.get('class') == 'CommandNotFound'
                            else [f'class {p.get("class")}']))
    s.send('denied by the QMP policy', 'POST', '/v1/machines/c1/qmp', 403,
           {'execute': 'human-monitor-command', 'arguments': {'command-line': 'info version'}},
           check=problem_is('Forbidden'))
    s.send('no execute', 'POST', '/v1/machines/c1/qmp', 400, {'arguments': {}},
           check=problem_is('InvalidArgument', 'execute'))
    s.send('timeout_s 0', 'POST', '/v1/machines/c1/qmp', 400, {'execute': 'query-status', 'timeout_s': 0},
           check=problem_is('InvalidArgument', 'timeout_s'))
    s.send('arguments not an object', 'POST', '/v1/machines/c1/qmp', 400,
           {'execute': 'query-status', 'arguments': [1]}, check=problem_is('InvalidArgument', 'arguments'))
    s.send('arguments null', 'POST', '/v1/machines/c1/qmp', 400,
           {'execute': 'query-status', 'arguments': None}, check=problem_is('InvalidArgument', 'arguments'))
    s.send('no body', 'POST', '/v1/machines/c1/qmp', 400, check=problem_is('InvalidArgument'))
    # A QEMU that does not answer (SIGSTOP): 504 at the command's own timeout; answered again
    # once it runs (its late reply to the timed-out command is dropped).
    _, c1 = s.send('read c1\'s pid', 'GET', '/v1/machines/c1', 200, check=machine_is('running'))
    pid = c1.get('pid') if isinstance(c1, dict) else None
    if isinstance(pid, int):
        os.kill(pid, signal.SIGSTOP)
        try:
            s.send('QEMU stopped: timeout', 'POST', '/v1/machines/c1/qmp', 504,
                   {'execute': 'query-status', 'timeout_s': 0.5}, check=problem_is('Timeout'))
        finally:
            os.kill(pid, signal.SIGCONT)
        s.send('QEMU running again', 'POST', '/v1/machines/c1/qmp', 200, {'execute': 'query-name'},
               check=lambda r, v: [] if v['return'].get('name') == 'c1' else [f'{v}'])
    s.send('pause', 'POST', '/v1/machines/c1/pause', 200, check=machine_is('paused'))
    s.send('pause a paused machine: nothing to do', 'POST', '/v1/machines/c1/pause', 200,
           check=machine_is('paused'))
    s.send('resume', 'POST', '/v1/machines/c1/resume', 200, check=machine_is('running'))
    run_stream_requests(s)
    s.send('bad mode', 'POST', '/v1/machines/c1/stop', 400, {'mode': 'frob'},
           check=problem_is('InvalidArgument', 'mode'))
    s.send('timeout_s out of range', 'POST', '/v1/machines/c1/stop', 400, {'timeout_s': 86401},
           check=problem_is('InvalidArgument', 'timeout_s'))
    s.send('stop (quit)', 'POST', '/v1/machines/c1/stop', 200, {'mode': 'quit', 'timeout_s': 10},
           check=machine_is('stopped', stop_reason=stop_reason('host-quit')))

    # Restart from stopped (a start), kill.
    s.send('restart a stopped machine', 'POST', '/v1/machines/c1/restart', 200, check=machine_is('running'))
    s.send('kill', 'POST', '/v1/machines/c1/kill', 200,
           check=machine_is('stopped', stop_reason=stop_reason('host-kill')))
    s.send('kill a stopped machine: nothing to do', 'POST', '/v1/machines/c1/kill', 200, {},
           check=machine_is('stopped'))
    s.send('unknown option', 'POST', '/v1/machines/c1/kill', 400, {'signal': 9},
           check=problem_is('InvalidArgument', 'signal'))
    s.send('timeout_s not an integer', 'POST', '/v1/machines/c1/stop', 400, {'timeout_s': 1.5},
           check=problem_is('InvalidArgument', 'timeout_s'))

    # Stop every machine (the host's shutdown).
    s.send('start again', 'POST', '/v1/machines/c1/start', 200, check=machine_is('running'))
    s.send('stop-all', 'POST', '/v1/stop-all', 200, {'concurrency': 4},
           check=lambda r, v: [] if r.json() == {'stopped': ['c1'], 'failed': [],
                                                 'event_seq': r.json()['event_seq']}
           else [f'body {r.json()}'])
    s.send('stopped by stop-all', 'GET', '/v1/machines/c1', 200, check=machine_is('stopped'))
    s.send('stop-all with nothing running', 'POST', '/v1/stop-all', 200,
           check=lambda r, v: [] if r.json()['stopped'] == [] else [f'body {r.json()}'])
    s.send('concurrency 0', 'POST', '/v1/stop-all', 400, {'concurrency': 0},
           check=problem_is('InvalidArgument', 'concurrency'))
    s.send('unknown option', 'POST', '/v1/stop-all', 400, {'mode': 'quit'},
           check=problem_is('InvalidArgument', 'mode'))

    # Logs.
    s.send('QEMU output', 'GET', '/v1/machines/c1/log', 200)
    s.send('last 5 lines', 'GET', '/v1/machines/c1/log?tail=5', 200,
           check=lambda r, v: [] if r.body.count(b'\n') <= 5 else [f'{len(r.body.splitlines())} lines'])
    s.send('tail not a number', 'GET', '/v1/machines/c1/log?tail=abc', 400,
           check=problem_is('InvalidArgument', 'tail'))
    s.send('tail negative', 'GET', '/v1/machines/c1/log?tail=-1', 400,
           check=problem_is('InvalidArgument', 'tail'))
    s.send('console log (no console)', 'GET', '/v1/machines/c1/console/log', 200,
           check=lambda r, v: [] if r.body == b'' else [f'{len(r.body)} bytes'])
    s.send('console log, tail', 'GET', '/v1/machines/c1/console/log?tail=10', 200)
    s.send('tail over 1000000', 'GET', '/v1/machines/c1/console/log?tail=1000001', 400,
           check=problem_is('InvalidArgument', 'tail'))

    # Conditional update; restart of a running machine (with shutdown mode quit).
    spec2 = dict(MACHINE_SPEC, shutdown={'mode': 'quit', 'timeout_s': 10})
    s.send('update with If-Match', 'PUT', '/v1/machines/c1/spec', 200, spec2, headers=['If-Match: "1"'],
           check=lambda r, m: machine_is('stopped', generation=2)(r, m)
           + ([] if m['spec']['shutdown']['mode'] == 'quit' else [f'spec {m["spec"]}']))
    s.send('stale If-Match', 'PUT', '/v1/machines/c1/spec', 412, spec2, headers=['If-Match: "1"'],
           check=problem_is('StaleGeneration'))
    s.send('If-Match with bare digits', 'PUT', '/v1/machines/c1/spec', 200, spec2, headers=['If-Match: 2'],
           check=machine_is('stopped', generation=3))
    s.send('unknown field', 'PUT', '/v1/machines/c1/spec', 400, dict(spec2, frob=1),
           check=problem_is('InvalidArgument', lambda f: isinstance(f, str) and f.endswith('frob')))
    s.send('nothing changed', 'GET', '/v1/machines/c1', 200, check=machine_is('stopped', generation=3))
    s.send('unconditional update', 'PUT', '/v1/machines/c1/spec', 200, spec2,
           check=machine_is('stopped', generation=4))
    s.send('start', 'POST', '/v1/machines/c1/start', 200, check=machine_is('running'))
    s.send('restart a running machine', 'POST', '/v1/machines/c1/restart', 200, check=machine_is('running'))
    s.send('metrics, with QMP and HTTP histograms', 'GET', '/metrics', 200,
           check=lambda r, v: metrics_text(r, v) + (
               [] if b'qmachined_qmp_command_duration_seconds_bucket{le="+Inf"}' in r.body
               else ['no QMP latency histogram']))
    s.send('delete with force', 'DELETE', '/v1/machines/c1?force=true', 204)
    s.send('deleted', 'GET', '/v1/machines', 200,
           check=lambda r, v: [] if v == {'machines': []} else [f'{v}'])

    # The unknown machine, on every {name} route.
    for template, method, op in contract.operations():
        if '{name}' not in template:
            continue
        target = template.replace('{name}', 'nope')
        body = {'execute': 'query-status'} if target.endswith('/qmp') else (
            MACHINE_SPEC if method == 'PUT' else None)
        if target.endswith('/console/wait'):
            body = {'pattern': 'x', 'timeout_s': 0.1}
        s.send('unknown machine', method, target, 404, body, check=problem_is('NoSuchMachine'))


def sse_messages(body):
    """The messages of a Server-Sent Events body: (fields dict) per message, comments left out."""
    out = []
    for block in body.decode().split('\n\n'):
        fields = {}
        for line in block.split('\n'):
            if line and not line.startswith(':'):
                k, _, v = line.partition(': ')
                fields[k] = v
        if fields:
            out.append(fields)
    return out


def run_stream_requests(s):
    """The waits and the event stream, with c1 running (no console)."""
    # The events of c1 so far: its creation and its states, in order, then the live stream.
    first = {}

    def from_the_start(r, v):
        msgs = sse_messages(r.body)
        names = [m.get('event') for m in msgs]
        ids = [int(m['id']) for m in msgs]
        first['id'] = ids[0] if ids else 0
        problems = [] if names[:1] == ['MACHINE_CREATED'] and 'STATE_CHANGED' in names else [f'names {names}']
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            problems.append(f'ids {ids}')
        for m in msgs:
            event = json.loads(m['data'])
            if event['seq'] != int(m['id']) or event['event'] != m['event'] or event['machine'] != 'c1':
                problems.append(f'message {m} does not match its event')
        return problems
    s.send('events of c1 since 0', 'GET', '/v1/events?since=0&machine=c1', 200, check=from_the_start,
           stream_s=1)
    s.send('Last-Event-ID resumes after it', 'GET', '/v1/events?machine=c1', 200,
           headers=[f'Last-Event-ID: {first["id"]}'], stream_s=1,
           check=lambda r, v: [] if [int(m['id']) for m in sse_messages(r.body)][:1]
           and min(int(m['id']) for m in sse_messages(r.body)) > first['id']
           else [f'{r.body[:300]!r}'])
    # A number of an earlier run (below this run's first): told what it lost, with a lag notice.
    s.send('Last-Event-ID of an earlier run', 'GET', '/v1/events?machine=c1', 200,
           headers=['Last-Event-ID: 1'], stream_s=1,
           check=lambda r, v: [] if sse_messages(r.body)[:1] and
           sse_messages(r.body)[0].get('event') == 'lagged' and
           json.loads(sse_messages(r.body)[0]['data'])['first_missing'] == 2
           else [f'{r.body[:300]!r}'])
    match = urllib.parse.quote(json.dumps({'data': {'state': 'running'}}))
    s.send('filtered by name and match', 'GET',
           f'/v1/events?since=0&event=STATE_CHANGED&event=RESUME&match={match}', 200, stream_s=1,
           check=lambda r, v: [] if sse_messages(r.body) and all(
               json.loads(m['data'])['data']['state'] == 'running' for m in sse_messages(r.body))
           else [f'{r.body[:300]!r}'])
    s.send('since not a number', 'GET', '/v1/events?since=x', 400,
           check=problem_is('InvalidArgument', 'since'))
    s.send('match not an object', 'GET', '/v1/events?match=%5B1%5D', 400,
           check=problem_is('InvalidArgument', 'match'))
    s.send('bad machine name', 'GET', '/v1/events?machine=a%2Fb', 400,
           check=problem_is('InvalidArgument', 'machine'))
    s.send('unknown query parameter', 'GET', '/v1/events?frob=1', 400,
           check=problem_is('InvalidArgument', 'frob'))
    s.send('machine twice', 'GET', '/v1/events?machine=c1&machine=c2', 400,
           check=problem_is('InvalidArgument', 'machine'))
    s.send('bad Last-Event-ID', 'GET', '/v1/events', 400, headers=['Last-Event-ID: soon'],
           check=problem_is('InvalidArgument', 'Last-Event-ID'))

    # events/wait: what the last action caused, found in the ring; a wait that times out.
    since = s.last_seq
    s.send('pause to have something to wait for', 'POST', '/v1/machines/c1/pause', 200,
           check=machine_is('paused'))
    s.send('the STOP the pause caused', 'POST', '/v1/machines/c1/events/wait', 200,
           {'event': 'STOP', 'since': since, 'timeout_s': 5},
           check=lambda r, v: [] if not v['timed_out'] and v['event']['event'] == 'STOP'
           and v['event']['machine'] == 'c1' and v['event']['qmp'] and v['event']['seq'] > since
           else [f'{v}'])
    s.send('a state by match', 'POST', '/v1/machines/c1/events/wait', 200,
           {'event': 'STATE_CHANGED', 'match': {'data': {'state': 'paused'}}, 'since': since},
           check=lambda r, v: [] if v['event']['data']['state'] == 'paused' else [f'{v}'])
    s.send('nothing comes', 'POST', '/v1/machines/c1/events/wait', 200,
           {'event': 'NO_SUCH_EVENT', 'timeout_s': 0.2},
           check=lambda r, v: [] if v['timed_out'] is True and 'event' not in v else [f'{v}'])
    s.send('resume after the wait', 'POST', '/v1/machines/c1/resume', 200, check=machine_is('running'))
    s.send('timeout_s over an hour', 'POST', '/v1/machines/c1/events/wait', 400, {'timeout_s': 3601},
           check=problem_is('InvalidArgument', 'timeout_s'))
    s.send('since negative', 'POST', '/v1/machines/c1/events/wait', 400, {'since': -1},
           check=problem_is('InvalidArgument', 'since'))
    s.send('match not an object', 'POST', '/v1/machines/c1/events/wait', 400, {'match': 'x'},
           check=problem_is('InvalidArgument', 'match'))
    s.send('unknown field', 'POST', '/v1/machines/c1/events/wait', 400, {'frob': 1},
           check=problem_is('InvalidArgument', 'frob'))

    # console/wait: c1 has no console (409); c5 has one, with nothing on it under -machine none.
    s.send('no console', 'POST', '/v1/machines/c1/console/wait', 409, {'pattern': 'x', 'timeout_s': 0.1},
           check=problem_is('StateConflict'))
    s.send('no pattern', 'POST', '/v1/machines/c1/console/wait', 400, {},
           check=problem_is('InvalidArgument', 'pattern'))
    s.send('bad regex', 'POST', '/v1/machines/c1/console/wait', 400, {'pattern': '(['},
           check=problem_is('InvalidArgument', 'pattern'))
    spec = dict(MACHINE_SPEC, console={'enabled': True}, shutdown={'mode': 'quit', 'timeout_s': 10})
    s.send('create c5 with a console', 'POST', '/v1/machines', 201, {'name': 'c5', 'spec': spec})
    s.send('start c5', 'POST', '/v1/machines/c5/start', 200, check=machine_is('running'))
    s.send('a silent console times out', 'POST', '/v1/machines/c5/console/wait', 200,
           {'pattern': 'login:', 'timeout_s': 0.2},
           check=lambda r, v: [] if v == {'timed_out': True, 'offset': 0} else [f'{v}'])

    # The console WebSocket: 426 without the upgrade, 409 without a console, 101 with one; one
    # writer at a time (a second is closed with 4409).
    key = base64.b64encode(b'sixteen byte key').decode()
    upgrade = ['Upgrade: websocket', 'Connection: Upgrade', 'Sec-WebSocket-Version: 13',
               f'Sec-WebSocket-Key: {key}']

    def upgrade_required(version=None):
        def check(r, p):
            problems = problem_is('UpgradeRequired')(r, p)
            if r.headers.get('upgrade', '').lower() != 'websocket':
                problems.append(f'Upgrade {r.headers.get("upgrade")!r}')
            if version and r.headers.get('sec-websocket-version') != version:
                problems.append(f'Sec-WebSocket-Version {r.headers.get("sec-websocket-version")!r}')
            return problems
        return check
    s.send('not a WebSocket', 'GET', '/v1/machines/c5/console', 426, check=upgrade_required())
    s.send('WebSocket version 8', 'GET', '/v1/machines/c5/console', 426,
           headers=upgrade[:2] + ['Sec-WebSocket-Version: 8', upgrade[3]],
           check=upgrade_required('13'))
    s.send('a handshake without a key', 'GET', '/v1/machines/c5/console', 400, headers=upgrade[:3],
           check=problem_is('InvalidArgument'))
    s.send('mode neither read nor write', 'GET', '/v1/machines/c5/console?mode=frob', 400,
           headers=upgrade, check=problem_is('InvalidArgument', 'mode'))
    s.send('a machine without a console', 'GET', '/v1/machines/c1/console', 409, headers=upgrade,
           check=problem_is('StateConflict'))
    s.websocket('the console of c5, to read', '/v1/machines/c5/console')

    def second_writer_refused(r, sock, rest):
        r2, _, sock2, rest2 = websocket_handshake(s.client.socket_path,
                                                  '/v1/machines/c5/console?mode=write')
        with sock2:
            if r2.status != 101:
                return [f'the second writer got {r2.status}, expected 101 and a close frame']
            opcode, payload, _ = read_frame(sock2, rest2)
            code = struct.unpack('>H', payload[:2])[0] if len(payload) >= 2 else None
            if opcode != 8 or code != 4409 or b'another client is writing' not in payload:
                return [f'the second writer got opcode {opcode}, code {code}: {payload[2:]!r}']
        return []
    s.websocket('the console of c5, to write; a second writer is closed with 4409',
                '/v1/machines/c5/console?mode=write', check=second_writer_refused)
    s.send('delete c5', 'DELETE', '/v1/machines/c5?force=true', 204)


def check_unlisted(contract, s):
    # Every listed path with every method it does not list: 405 and Allow.
    for template in contract.doc['paths']:
        listed = contract.methods_of(template)
        target = template.replace('{name}', 'c1')
        for method in METHODS:
            if method in listed:
                continue

            def allow_check(r, v, listed=listed):
                allow = r.headers.get('allow', '')
                got = {m.strip() for m in allow.split(',') if m.strip()}
                return [] if got == listed else [f'Allow {allow!r}, expected {sorted(listed)}']
            s.send(f'not a method of {template}', method, target, 405, check=allow_check)
    # Unlisted paths: 404 NotFound.
    for method, target in [('GET', '/'), ('GET', '/v1'), ('GET', '/v1/'), ('GET', '/v2/machines'),
                           ('GET', '/v1/machines/c1/frob'), ('POST', '/v1/machines/c1/start/x'),
                           ('GET', '/v1/machines/'), ('GET', '/v1//machines'), ('DELETE', '/v1/version/x'),
                           ('GET', '/v1/metrics'), ('GET', '/metrics/x')]:
        s.send('no such route', method, target, 404, check=problem_is('NotFound'))


def check_head_has_no_body(tap, client, target):
    """RFC 9110 9.3.2: the answer to HEAD has no content, whatever its Content-Length says. curl
    -X HEAD reads the body as for GET: a correct server makes it wait (3 s) for bytes that never come."""
    argv = ['curl', '-sS', '--path-as-is', '--unix-socket', client.socket_path, '-X', 'HEAD',
            '--max-time', '3', '-o', os.devnull, '-w', '%{http_code} %{size_download}',
            client.base_url + target]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    code, _, size = proc.stdout.decode().partition(' ')
    problems = []
    if code != '405':
        problems.append(f'status {code}')
    if size.strip() not in ('', '0'):
        problems.append(f'the 405 answer to HEAD carries {size.strip()} bytes of body (RFC 9110 9.3.2: none)')
    tap.result(f'HEAD {target}: the answer has no body', problems)


def check_shutdown(s, daemon):
    """While qmachined stops its machines on SIGTERM: 503 ShuttingDown."""
    spec = dict(MACHINE_SPEC, shutdown={'mode': 'powerdown', 'timeout_s': 3})
    s.send('create c3 (powerdown, 3 s)', 'POST', '/v1/machines', 201, {'name': 'c3', 'spec': spec})
    s.send('start c3', 'POST', '/v1/machines/c3/start', 200, check=machine_is('running'))
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.terminated = True
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if s.client.request('GET', '/v1/health').status == 503:
            break
        time.sleep(0.01)
    s.send('shutting down', 'GET', '/v1/health', 503, check=problem_is('ShuttingDown'))
    s.send('create while shutting down', 'POST', '/v1/machines', 503, {'name': 'c4'},
           check=problem_is('ShuttingDown'))
    s.send('start while shutting down', 'POST', '/v1/machines/c3/start', 503,
           check=problem_is('ShuttingDown'))


def check_coverage(tap, contract, s):
    for template, method, op in contract.operations():
        reached = s.reached.get((template, method), set())
        ok = reached & set(op['responses']) & successes(template, method)
        errors = {c for c in reached if c.startswith('4')}
        problems = []
        if not ok:
            problems.append(f'no documented success status reached (got {sorted(reached)})')
        if not errors:
            problems.append(f'no error status reached (got {sorted(reached)})')
        tap.result(f'{method} {template} reached {sorted(reached)}', problems)


# ---- the daemon ---------------------------------------------------------------------------------

class Daemon:
    def __init__(self, binary, tmp, tag, extra=()):
        self.state_dir = os.path.join(tmp, f's{tag}')
        self.runtime_dir = os.path.join(tmp, f'r{tag}')
        self.socket = os.path.join(self.runtime_dir, 'qmachined.sock')
        self.log_path = os.path.join(tmp, f'log{tag}')
        self.log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(
            [binary, '--bus', 'none', '--state-dir', self.state_dir, '--runtime-dir', self.runtime_dir,
             '--log-level', 'warn', '--shutdown-policy', 'stop-machines', *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.terminated = False  # SIGTERM sent

    def wait_ready(self, deadline_s=10.0):
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if os.path.exists(self.socket):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return False

    def terminate(self, timeout_s=60.0):
        """SIGTERM, then the exit status (None if it had to be killed)."""
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
        self.terminated = True
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, 'rb') as f:
            return f.read().decode(errors='replace')


def raw_exchange(socket_path, data, timeout_s):
    """Sends `data` on a new connection, then reads until the server closes it or `timeout_s`:
    the Response parsed from what came back (status 0: nothing came)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    got = b''
    try:
        sock.connect(socket_path)
        sock.sendall(data)
        while True:
            more = sock.recv(65536)
            if not more:
                break
            got += more
    except OSError:
        pass
    finally:
        sock.close()
    status, headers, body = parse_answer(got)
    return Response('GET', '(raw)', status, headers, body, '' if status else f'got {got[:200]!r}')


def check_limits(tap, contract, binary, tmp):
    """The limits' answers, against the document: 429 for machines (max-machines), event
    subscribers (rest-max-subscribers) and connections (rest-max-connections), 408 for a request
    that does not arrive within rest-request-timeout."""
    d = Daemon(binary, tmp, 'l', ['--max-machines', '1', '--rest-max-subscribers', '1',
                                  '--rest-max-connections', '3', '--rest-request-timeout', '2'])
    held = []
    try:
        if not tap.result('qmachined with small limits is ready', [] if d.wait_ready() else [
                f'no socket after 10 s (exit {d.proc.poll()}): {d.output()[-500:]}']):
            return
        s = Session(tap, contract, Client(tmp, socket_path=d.socket))
        s.send('the one machine max-machines allows', 'POST', '/v1/machines', 201,
               {'name': 'l1', 'spec': MACHINE_SPEC})
        s.send('a machine over max-machines', 'POST', '/v1/machines', 429,
               {'name': 'l2', 'spec': MACHINE_SPEC}, check=problem_is('LimitExceeded'))
        s.send('nothing was created', 'GET', '/v1/machines', 200,
               check=lambda r, v: [] if [m['name'] for m in v['machines']] == ['l1'] else [f'{v}'])
        # One event stream open (a connection of its own), then a second subscriber.
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(stream)
        stream.settimeout(10)
        stream.connect(d.socket)
        stream.sendall(b'GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n')
        first = recv_until(stream, b': subscribed')
        tap.result('an event stream is open', [] if b': subscribed' in first else [f'{first!r}'])
        s.send('a subscriber over rest-max-subscribers', 'GET', '/v1/events', 429,
               check=problem_is('LimitExceeded'))
        # Two more idle connections make three: the fourth is refused.
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(d.socket)
            held.append(c)
        s.send('a connection over rest-max-connections', 'GET', '/v1/health', 429,
               check=lambda r, v: problem_is('LimitExceeded')(r, v) + (
                   [] if r.headers.get('retry-after') == '1' else
                   [f'Retry-After {r.headers.get("retry-after")!r}']))
        for c in held[1:]:
            c.close()
        del held[1:]
        # Half a request line, then nothing: 408 after rest-request-timeout (2 s).
        started = time.monotonic()
        r = raw_exchange(d.socket, b'GET /v1/hea', 10)
        waited = time.monotonic() - started
        problems = [] if r.status == 408 else [f'got {r.status}: {r.error} {r.body[:200]!r}']
        if r.status == 408:
            response_obj = contract.resolve(contract.doc['components']['responses']['RequestTimeout'])
            problems += check_against(contract, response_obj, r)
            problems += problem_is('RequestTimeout')(r, r.json())
        if not 1.5 <= waited <= 8:
            problems.append(f'answered after {waited:.1f} s, rest-request-timeout is 2 s')
        tap.result('a request that does not arrive -> 408 (RequestTimeout), as documented', problems)
        s.send('the daemon still answers', 'GET', '/v1/health', 200)
    finally:
        for c in held:
            c.close()
        status = d.terminate()
        tap.result('qmachined with small limits exits 0 on SIGTERM',
                   [] if status == 0 else [f'exit {status}: {d.output()[-500:]}'])
        d.kill()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def check_tcp(tap, contract, binary, tmp):
    """The TCP listener: the bearer token, 401 with WWW-Authenticate without it."""
    port = free_port()
    d = Daemon(binary, tmp, 't', ['--rest-listen', f'127.0.0.1:{port}'])
    try:
        if not tap.result('qmachined with --rest-listen is ready', [] if d.wait_ready() else [
                f'no socket after 10 s (exit {d.proc.poll()}): {d.output()[-500:]}']):
            return
        client = Client(tmp, base_url=f'http://127.0.0.1:{port}')
        s = Session(tap, contract, client)
        unauthorized = problem_is('Unauthorized', more=lambda p: [])
        s.send('TCP without a token', 'GET', '/v1/version', 401, check=unauthorized)
        s.send('TCP with a wrong token', 'GET', '/v1/machines', 401,
               headers=['Authorization: Bearer wrong'], check=unauthorized)
        token_path = os.path.join(d.state_dir, 'rest.token')
        try:
            with open(token_path, encoding='utf-8') as f:
                token = f.read().strip()
            mode = os.stat(token_path).st_mode & 0o777
        except OSError as e:
            tap.result('the token file exists', [str(e)])
            return
        tap.result('the token file is mode 0600', [] if mode == 0o600 else [f'mode {mode:o}'])
        s.send('TCP with the token', 'GET', '/v1/version', 200, headers=[f'Authorization: Bearer {token}'])
        s.send('TCP with the token, unknown route', 'GET', '/v1/frob', 404,
               headers=[f'Authorization: Bearer {token}'], check=problem_is('NotFound'))
        sock_mode = os.stat(d.socket).st_mode & 0o777
        tap.result('the unix socket is mode 0660', [] if sock_mode == 0o660 else [f'mode {sock_mode:o}'])
    finally:
        status = d.terminate()
        tap.result('qmachined with --rest-listen exits 0 on SIGTERM',
                   [] if status == 0 else [f'exit {status}: {d.output()[-500:]}'])
        d.kill()


def main():
    if len(sys.argv) != 3:
        print('usage: contract_test.py QMACHINED PROTO_DIR', file=sys.stderr)
        return 2
    binary = os.path.abspath(sys.argv[1])
    tap = Tap()
    try:
        contract = Contract(sys.argv[2])
    except (OSError, ValueError, yaml.YAMLError) as e:
        tap.result('openapi.yaml, machine.schema.json and errors.json parse', [str(e)])
        return tap.finish()
    tap.result('openapi.yaml, machine.schema.json and errors.json parse', [])
    static_checks(tap, contract)

    # Socket paths must stay under 108 bytes: a short directory in /tmp.
    tmp = tempfile.mkdtemp(dir='/tmp', prefix='qmr')
    daemon = None
    try:
        try:
            daemon = Daemon(binary, tmp, '')
        except OSError as e:
            print(f'Bail out! cannot run {binary}: {e}')
            return 1
        if not daemon.wait_ready():
            tap.result('qmachined is ready (its socket exists) within 10 s',
                       [f'no socket (exit {daemon.proc.poll()})'])
            tap.diag(daemon.output()[-2000:])
            return tap.finish()
        tap.result('qmachined is ready (its socket exists) within 10 s', [])
        session = Session(tap, contract, Client(tmp, socket_path=daemon.socket))
        run_requests(contract, session)
        check_unlisted(contract, session)
        check_head_has_no_body(tap, session.client, '/v1/version')
        check_shutdown(session, daemon)
        check_coverage(tap, contract, session)
        status = daemon.terminate()
        tap.result('qmachined exits 0 on SIGTERM', [] if status == 0 else [f'exit {status}'])
        if tap.failed:
            tap.diag('qmachined said:\n' + daemon.output()[-4000:])
        check_tcp(tap, contract, binary, tmp)
        check_limits(tap, contract, binary, tmp)
    finally:
        if daemon is not None:
            daemon.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return tap.finish()


if __name__ == '__main__':
    sys.exit(main())
