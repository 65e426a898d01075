"""The fixed layout of the live pool, a file in the runtime dir mapped by every process.

Theory of operation
-------------------
The file holds, in order: a header, a names table (JSON, written once at
creation), one health record per server, one admin word per server, then
one admin time per server, one check latency histogram per server, one slot
per worker, and the carried block.  Every part has exactly one writer:

* header versions: ``health_version`` is bumped by the prober whenever a
  server's health changes, ``admin_version`` by the supervisor whenever an
  admin state changes; workers compare them with what they last saw, so the
  common pick reads two words and reuses its cached list of eligible servers;
  the supervisor also counts worker restarts and reloads there;
* health records: the prober, under a sequence lock.  A write stores an odd
  sequence (one more than it found, made odd), the fields, then that plus
  one; a reader keeps its copy of the fields if it read the same even
  sequence before and after.  A writer may die between its two stores and
  leave the sequence odd: readers then try a bounded number of times and
  report the record unreadable rather than wait for ever; the next write
  makes it readable again (its first store is odd whatever it found), and a
  prober, when it starts, rewrites the records a predecessor left odd;
* check latency histograms: the prober (one counter per bucket);
* admin words and admin times: the supervisor (one aligned 8-byte word
  each, never torn).  A server's admin time is when it last went back to
  ``ready`` from ``drain`` or ``maint`` (monotonic seconds, 0: never); the
  supervisor stores it before the state and bumps ``admin_version`` last, so
  a worker that sees the version sees both;
* worker slots: their worker.  Counters are single aligned 8-byte words
  (an aligned store is atomic on the machines we run on), so a reader may see
  one counter a step ahead of another but never half a number;
* the carried block: the supervisor, under a sequence lock as the health
  records are.  It holds what the generations that have finished counted,
  laid out like a worker slot's counters (answers, then per server, then per
  listener; the active words stay zero: an open connection is never carried),
  followed by one accepted count per slot; ``K_FOLDS`` is the number of the
  last fold it holds (folds are numbered 1, 2, ... over the instance's life);
* ``H_FOLDED``: the supervisor, once, when the generation has finished;
* the client tables (one per listener with a client limit): every worker,
  each word written as a whole, and each open count by one worker only;
  :mod:`lb.pool.clients` says why that is enough;
* the spare servers (at the end of the file, found through
  ``H_SPARE_OFF``): servers that come and go at runtime, in slots reserved
  per backend.  A spare slot is a server index like any other (its health
  record, admin word, histogram and counters are where a configured server's
  are); its spare record (address, port, weight, name) is written under a
  sequence lock by one writer per slot: the supervisor for a backend's
  ``spare_servers`` (``splicelb server add``), the prober for its
  ``discovery.max_servers`` (DNS).  Each bumps its own version word after a
  change.  The prober also writes, per spare slot, the epoch its health
  record belongs to, and per backend the state of its DNS answer;
  :mod:`lb.pool.servers` says how they fit together.

Totals that outlive reloads
---------------------------
A reader reports a total as the current pool's carried block plus the slots
of every pool still running, matched by names (a server by its backend and
name, a listener by its name); what the current generation does not name is
not reported.  A worker's accepted count goes on from its own pool's carried
count for its slot, so it does not fall when a reload makes its generation
an older one.

When a generation's last child is gone the supervisor *folds* it: it takes
the next fold number ``n``, stores ``n`` in the finished pool's ``H_FOLDED``,
adds the pool's slots to the carried block of every other pool it keeps and
sets their ``K_FOLDS`` to ``n`` (every pool kept holds the same folds: a new
pool starts from the current one's block), and only then unlinks the
finished pool.  A reader opens every pool file first, then the current one,
copies the current carried block (consistent, with its ``K_FOLDS`` ``k``),
then loads each pool's ``H_FOLDED`` ``f``: a pool with ``0 < f <= k`` is in
the copy, and its slots are skipped; any other pool's slots are added.

So in the window where a reader has the finished pool mapped and the fold is
under way, it sees neither a double count nor a gap: never both the pool's
slots and the carried totals that hold them (the mark is stored before the
fold and loaded after the copy, the order the sequence locks rely on too),
and never neither (a pool unlinked before the reader listed the files was
folded before, into every pool the reader can take for the current one).  A
generation created after the reader listed the files, unless it is the
current one, is counted from the next read on: a total late, never one that
falls.  Each total is a sum of words that only grow: it never goes backwards
while the instance runs.

Parts added since this layout version are found through header words that a
file of an earlier release holds as zero (``H_CLIENT_TABLES``): such a file
still opens, and has none of them.

Everything is 8-byte aligned and addressed through ``memoryview.cast("Q")``
and ``cast("d")`` views, so a single counter update is one index store.

Memory ordering: a memoryview loads or stores one item with a fixed-size
``memcpy``, which compilers make one aligned 8-byte move, and there is no
fence anywhere.  The sequence lock needs other processes to see a writer's
stores in program order and a reader's loads to be done in program order:
x86-64 (TSO) guarantees both, and it is the machine we run on.  On a weakly
ordered CPU (arm64) a reader could see the new sequence before the fields it
covers and keep a record mixed from two writes; each word would still be
whole (aligned 8-byte accesses are single-copy atomic there), only the result
text could mix bytes of two writes.  Python offers no barrier to rule it out.
"""

from __future__ import annotations

import struct
from typing import Final

MAGIC: Final = 0x3130424C43494C50  # b"PLICLB01" little-endian, a sanity check
LAYOUT_VERSION: Final = 5

# Older layouts this code still reads: the pools of the generation that an upgrade
# (``splicelb upgrade``) finds running, written by the code before it.  From
# OLDEST_READABLE on, the header words, the admin words, the worker slots and the
# carried block are the same, and each part is found through the offsets the
# header stores; only what OLDER_RECORDS says differs.  A change to any other part
# must raise OLDEST_READABLE to the new version (an upgrade across it would then
# be refused by the new code's check, and the instance go on as it was).
OLDEST_READABLE: Final = 4
# version: (words per health record, byte offset of its text, R_UP_AT or -1: none);
# versions before 5 keep no admin times (ready_at reads 0).
OLDER_RECORDS: dict[int, tuple[int, int, int]] = {4: (21, 72, -1)}

# Header: words (8 bytes each) by index.
H_MAGIC, H_VERSION, H_GENERATION, H_NSERVERS, H_NSLOTS = 0, 1, 2, 3, 4
H_NAMES_OFF, H_NAMES_LEN, H_HEALTH_OFF, H_ADMIN_OFF, H_SLOTS_OFF, H_SLOT_SIZE = 5, 6, 7, 8, 9, 10
H_HEALTH_VERSION, H_ADMIN_VERSION = 11, 12
H_PROBER_PID, H_PROBER_BEAT = 13, 14  # BEAT is a double (monotonic seconds)
H_NLISTENERS, H_RESTARTS, H_RELOADS = 15, 16, 17
H_HANDOVER_TO = 18  # a retiring generation's workers hand their tunnels to this one (0: none)
H_FOLDED = 19  # the fold that put this finished generation's slots in the carried totals (0: none)
H_CLIENT_TABLES, H_CLIENT_ENTRIES = 20, 21  # client tables, and entries in each (0: none)
H_CLIENT_SEED = 22  # the odd multiplier that spreads clients over a table, drawn at creation
H_SPARE_OFF = 23  # the spare servers' region (lb.pool.servers); 0: none (an earlier file)
HEADER_WORDS: Final = 24

# Server health record (prober-written), words by index.
R_SEQ, R_HEALTH, R_RISE_COUNT, R_FALL_COUNT, R_CHECKED_AT, R_CHANGED_AT = 0, 1, 2, 3, 4, 5
R_LATENCY, R_CHECKS, R_OK_AT, R_UP_AT = 6, 7, 8, 9
# Doubles: CHECKED_AT and OK_AT (last check, last successful check) and UP_AT (last
# change from down to up; 0: never) are monotonic seconds, CHANGED_AT (last change
# of health) is wall-clock, LATENCY is seconds.
R_TEXT_OFF: Final = 10 * 8  # byte offset of the last result text within the record
TEXT_BYTES: Final = 96  # NUL-padded UTF-8
RECORD_WORDS: Final = 10 + TEXT_BYTES // 8

# Health values.
UNCHECKED, UP, DOWN = 0, 1, 2
HEALTH_NAMES: Final = ("unchecked", "up", "down")
HEALTH_UNKNOWN: Final = "unknown"  # what readers show for a record they cannot read

# Admin values.
READY, DRAIN, MAINT = 0, 1, 2
ADMIN_NAMES: Final = ("ready", "drain", "maint")

# Worker slot header, words by index.
S_PID, S_GENERATION, S_BEAT, S_STATE, S_CONNECTIONS, S_ACCEPTED = 0, 1, 2, 3, 4, 5
S_SUSPECT_VERSION: Final = 6
S_ADOPTED: Final = 7  # tunnels this worker adopted from an older generation (handover)
S_ANSWERS: Final = 8  # up to 8 words: counts of the statuses in ANSWER_STATUSES
# 0: any other.  A status is added at the end, in a word earlier files hold as zero (all 8 used).
ANSWER_STATUSES: Final = (400, 403, 408, 431, 500, 503, 0, 429)
SLOT_HEADER_WORDS: Final = 16

# Worker slot state values.
SLOT_EMPTY, SLOT_RUNNING, SLOT_DRAINING = 0, 1, 2

# Per-server counters inside a worker slot, words by index; per-listener ones follow them.
C_ACTIVE, C_TOTAL, C_BYTES_IN, C_BYTES_OUT, C_SUSPECT_AT, C_FAILED = 0, 1, 2, 3, 4, 5
COUNTER_WORDS: Final = 6  # SUSPECT_AT is a double (monotonic seconds)
LISTENER_WORDS: Final = 4  # C_ACTIVE, C_TOTAL, C_BYTES_IN, C_BYTES_OUT
# The counters readers report, by name (a listener has the first four).
SERVER_COUNTERS: Final = (
    ("active", C_ACTIVE),
    ("total", C_TOTAL),
    ("bytes_in", C_BYTES_IN),
    ("bytes_out", C_BYTES_OUT),
    ("failed_connects", C_FAILED),
)
LISTENER_COUNTERS: Final = SERVER_COUNTERS[:LISTENER_WORDS]

# The carried block: words by index (answers, server and listener counters at their
# places in a worker slot), then one accepted count per slot.
K_SEQ, K_FOLDS = 0, 1
# The words a fold adds up: totals, never C_ACTIVE (open now) nor C_SUSPECT_AT (a time).
SERVER_TOTALS: Final = (C_TOTAL, C_BYTES_IN, C_BYTES_OUT, C_FAILED)
LISTENER_TOTALS: Final = (C_TOTAL, C_BYTES_IN, C_BYTES_OUT)

# Check latency histogram per server: a count per bucket (upper bounds in seconds,
# the last one +Inf), then the sum of latencies (a double).
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HIST_WORDS: Final = len(LATENCY_BUCKETS) + 2

# Client tables (lb.pool.clients): all of a pool's together take at most CLIENT_TABLE_BYTES.
CLIENT_TABLE_BYTES: Final = 1 << 20
# A client entry: words by index, then one 4-byte count of open connections per worker slot.
E_KEY, E_TAT = 0, 1  # TAT is a double (monotonic seconds)
ENTRY_HEADER_WORDS: Final = 2
CLIENT_PROBES: Final = 16  # entries a client is looked for in, from the place its hash gives

# The spare servers' region (lb.pool.servers): a header, then a record per spare slot,
# then a checked epoch per spare slot, then a discovery record per backend.
P_API_VERSION, P_DNS_VERSION, P_NSPARE, P_NBACKENDS = 0, 1, 2, 3
SPARE_HEADER_WORDS: Final = 4
# A spare record: words by index.  ADDED_AT and FREED_AT are doubles (monotonic seconds).
D_SEQ, D_STATE, D_EPOCH, D_WEIGHT, D_PORT, D_FAMILY, D_SOURCE = 0, 1, 2, 3, 4, 5, 6
D_ADDED_AT, D_FREED_AT = 7, 8
D_HOST_OFF: Final = 10 * 8  # byte offset of the packed IP address (16 bytes)
D_NAME_OFF: Final = 12 * 8  # byte offset of the name (NUL-padded UTF-8)
NAME_BYTES: Final = 64
SPARE_WORDS: Final = 12 + NAME_BYTES // 8
# Spare slot states, and where a server in one came from.
SPARE_FREE, SPARE_USED = 0, 1
SOURCE_CONFIG, SOURCE_API, SOURCE_DNS = 0, 1, 2
SOURCE_NAMES: Final = ("config", "api", "dns")
# A backend's discovery record (prober-written, sequence lock): words by index.  OK_AT is
# a double (wall clock of the last good answer; 0: none yet).
G_SEQ, G_OK_AT, G_FAILURES, G_SERVERS = 0, 1, 2, 3
G_TEXT_OFF: Final = 4 * 8  # the last failure's text (TEXT_BYTES)
DISCOVERY_WORDS: Final = 4 + TEXT_BYTES // 8

_TEXT = struct.Struct(f"{TEXT_BYTES}s")


class Geometry:
    """Where each part of a pool file lies, in 8-byte words from the start.

    Offsets are computed once: readers on the hot path index with them.
    """

    __slots__ = (
        "admin_at_off",
        "admin_off",
        "carried_off",
        "carried_words",
        "client_entries",
        "client_tables",
        "clients_off",
        "entry_words",
        "health_off",
        "hist_off",
        "names_len",
        "names_off",
        "nbackends",
        "nlisteners",
        "nservers",
        "nslots",
        "nspare",
        "record_words",
        "slot_words",
        "slots_off",
        "spare_off",
        "table_words",
        "text_off",
        "total_words",
        "up_at",
    )

    def __init__(
        self,
        nservers: int,
        nslots: int,
        names_len: int,
        nlisteners: int = 0,
        client_tables: int = 0,
        client_entries: int = 0,
        nspare: int = 0,
        nbackends: int = 0,
    ) -> None:
        self.nservers = nservers
        self.nslots = nslots
        self.names_len = names_len
        self.nlisteners = nlisteners
        self.record_words, self.text_off, self.up_at = RECORD_WORDS, R_TEXT_OFF, R_UP_AT
        self.names_off = HEADER_WORDS
        self.health_off = self.names_off + (names_len + 7) // 8
        self.admin_off = self.health_off + nservers * RECORD_WORDS
        self.admin_at_off = self.admin_off + nservers
        self.hist_off = self.admin_at_off + nservers
        self.slots_off = self.hist_off + nservers * HIST_WORDS
        self.slot_words = SLOT_HEADER_WORDS + nservers * COUNTER_WORDS + nlisteners * LISTENER_WORDS
        self.carried_off = self.slots_off + nslots * self.slot_words
        self.carried_words = self.slot_words + nslots
        self.clients_off = self.carried_off + self.carried_words
        self.client_tables = client_tables
        self.client_entries = client_entries
        self.entry_words = entry_words(nslots)
        # A table's entries: the places, and the CLIENT_PROBES - 1 a search may go past them.
        self.table_words = (
            (client_entries + CLIENT_PROBES - 1) * self.entry_words if client_tables else 0
        )
        self.spare_off = self.clients_off + client_tables * self.table_words
        self.nspare, self.nbackends = nspare, nbackends
        self.total_words = self.spare_off + spare_words(nspare, nbackends)

    @classmethod
    def older(cls, header: list[int], version: int) -> Geometry:
        """An older layout's geometry (see ``OLDEST_READABLE``), from its header."""
        geo = cls(
            header[H_NSERVERS],
            header[H_NSLOTS],
            header[H_NAMES_LEN],
            header[H_NLISTENERS],
            header[H_CLIENT_TABLES],
            header[H_CLIENT_ENTRIES],
        )
        geo.record_words, geo.text_off, geo.up_at = OLDER_RECORDS.get(
            version, (RECORD_WORDS, R_TEXT_OFF, R_UP_AT)
        )
        geo.health_off, geo.admin_off = header[H_HEALTH_OFF], header[H_ADMIN_OFF]
        geo.slots_off, geo.slot_words = header[H_SLOTS_OFF], header[H_SLOT_SIZE]
        geo.admin_at_off = geo.admin_off + geo.nservers if version >= 5 else -1
        geo.hist_off = geo.slots_off - geo.nservers * HIST_WORDS  # histograms precede slots
        geo.carried_off = geo.slots_off + geo.nslots * geo.slot_words
        geo.carried_words = geo.slot_words + geo.nslots
        geo.clients_off = geo.carried_off + geo.carried_words
        geo.spare_off = geo.nspare = geo.nbackends = 0  # no spare servers before version 5
        geo.total_words = geo.clients_off + geo.client_tables * geo.table_words
        return geo

    def record(self, server: int) -> int:
        return self.health_off + server * self.record_words

    def slot(self, slot: int) -> int:
        return self.slots_off + slot * self.slot_words

    def counter(self, slot: int, server: int) -> int:
        return self.slots_off + slot * self.slot_words + SLOT_HEADER_WORDS + server * COUNTER_WORDS

    def listener_counter(self, slot: int, listener: int) -> int:
        return self.counter(slot, self.nservers) + listener * LISTENER_WORDS

    def server_at(self, server: int) -> int:
        """Where a server's counters start in a slot (and in the carried block)."""
        return SLOT_HEADER_WORDS + server * COUNTER_WORDS

    def listener_at(self, listener: int) -> int:
        """Where a listener's counters start in a slot (and in the carried block)."""
        return SLOT_HEADER_WORDS + self.nservers * COUNTER_WORDS + listener * LISTENER_WORDS

    def accepted_at(self, slot: int) -> int:
        """Where a slot's carried accepted count is in the carried block."""
        return self.slot_words + slot

    def histogram(self, server: int) -> int:
        return self.hist_off + server * HIST_WORDS

    def client_table(self, table: int) -> int:
        return self.clients_off + table * self.table_words


def spare_words(nspare: int, nbackends: int) -> int:
    """The size of the spare servers' region."""
    return SPARE_HEADER_WORDS + nspare * (SPARE_WORDS + 1) + nbackends * DISCOVERY_WORDS


def entry_words(nslots: int) -> int:
    """The words of a client entry: its header, then a 4-byte count per worker slot."""
    return ENTRY_HEADER_WORDS + (nslots + 1) // 2


def client_entries(tables: int, nslots: int) -> int:
    """The places a client's hash may send it to in each of ``tables`` client tables: as
    many as fit in ``CLIENT_TABLE_BYTES`` with the ``CLIENT_PROBES - 1`` entries that
    follow the last place (a search never wraps around)."""
    if not tables:
        return 0
    fit = CLIENT_TABLE_BYTES // (tables * entry_words(nslots) * 8)
    return max(1, fit - (CLIENT_PROBES - 1))


def encode_text(text: str) -> bytes:
    """A result text as stored: UTF-8, cut to fit, NUL padded."""
    raw = text.encode("utf-8", "replace")[:TEXT_BYTES]
    return _TEXT.pack(raw.decode("utf-8", "ignore").encode())


def decode_text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")
