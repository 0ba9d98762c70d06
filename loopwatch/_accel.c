/* loopwatch._accel: the per-task and per-step hot paths of loopwatch, compiled.
 *
 * Optional: built at install time where a C compiler is found (see hatch_build.py), and used
 * unless LOOPWATCH_ACCEL=0. loopwatch/_timing.py and loopwatch/_tasks.py hold the pure-Python
 * versions of everything here and remain the reference for what it does.
 *
 * Timed    the step-timing proxy between an asyncio.Task and its coroutine. The C Task drives
 *          its coroutine with PyIter_Send(), which calls the am_send slot: a step is a C call,
 *          and a return reaches the task as PYGEN_RETURN with no StopIteration made. With
 *          timing off (LOOPWATCH_STEP_TIMING=0) it only forwards, and still sees the end.
 *          When the coroutine ends, its task's counts and its coroutine's row are updated here
 *          (TaskCounts, Row), in the loop's thread, with no lock: the same as
 *          TaskTracker.proxy_ended.
 * Factory  the task factory's common case: a plain coroutine created from a file whose kind
 *          (the program's, or asyncio/uvloop/loopwatch's) is already in the machinery cache.
 *          Anything else is handed to the pure-Python factory (`fallback`), which does it all.
 * TaskCounts, Row   the bases of _tasks.TaskStats and _timing.Row: plain C numbers that Python
 *          reads and writes as attributes.
 *
 * Clock: clock_gettime(CLOCK_MONOTONIC), the clock of time.monotonic() and time.perf_counter()
 * on Linux, the only platform this is built for. A task step is timed by its length only, and
 * the two reads around every step are most of what timing a step costs (a read is about 30 ns
 * on a VM), so where the processor's time-stamp counter is invariant (x86-64, CPUID 0x80000007
 * EDX bit 8: a constant rate that never stops) a step is timed with RDTSC (about 10 ns), its
 * ticks converted at a rate measured against CLOCK_MONOTONIC at import. Elsewhere steps read
 * CLOCK_MONOTONIC.
 *
 * Errors raised by a hook (on_slow, proxy_ended, Table.row) go to sys.unraisablehook and never
 * reach the program.
 */

#define _GNU_SOURCE /* pthread_timedjoin_np */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
/* The creation site of a task is found by walking the interpreter's own frames, as
   PyEval_GetFrame()/PyFrame_GetBack() would, but without making a frame object for each one (a
   Python frame object per task made from a short-lived frame such as asyncio.create_task's). The
   layout is CPython's internal one, which this module is only ever loaded on the versions it was
   built and tested for (see _native.py). */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED)
#define LW_FRAME_WALK 1
#ifndef Py_BUILD_CORE
#define Py_BUILD_CORE 1
#define LW_UNDEF_BUILD_CORE 1
#endif
#include "internal/pycore_frame.h"
#ifdef LW_UNDEF_BUILD_CORE
#undef Py_BUILD_CORE
#endif
#endif
#include <time.h>
#include <math.h>
#include <stdint.h>
#ifdef __linux__
#include <fcntl.h>
#include <sys/timerfd.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <x86intrin.h>
#define HAVE_TSC 1
#endif

#define API_VERSION 16
#define MAX_BUCKETS 40

/* -- module-wide configuration (set once by loopwatch._timing / _tasks) ---------------- */

static PyObject *g_task_type;  /* asyncio.Task */
static PyObject *g_cancelled;  /* asyncio.CancelledError */
static PyObject *g_machinery;  /* dict: file name -> True (asyncio/uvloop/loopwatch) / False */
static PyObject *g_handle_run; /* code of asyncio.Handle._run */
static PyObject *g_driver;     /* code of loopwatch's run wrapper, or NULL */
static double g_duration[MAX_BUCKETS], g_latency[MAX_BUCKETS];
static Py_ssize_t g_nduration = -1, g_nlatency = -1;
static PyObject *g_loop_kwnames; /* ("loop",) */

static PyObject *s_cancel_arrived, *s_cancel_ended;
static PyObject *s_proxy_ended, *s_half, *s_threshold, *s_on_slow, *s_throw, *s_close, *s_name,
    *s_qualname, *s_cr_frame, *s_cr_code, *s_cr_await, *s_cr_running, *s_cr_suspended,
    *s_cr_origin, *s_row, *s_loop, *s__compiled, *s_adopt;

static inline double
now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- the step clock: a stamp is a tick of the time-stamp counter, or a nanosecond ---------- */

static int g_use_tsc;          /* steps are stamped with RDTSC */
static double g_tick_s = 1e-9; /* seconds per stamp unit */
static double g_tsc_tick_s;    /* seconds per counter tick; 0: the counter is not usable */

static inline uint64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t
stamp(void)
{
#ifdef HAVE_TSC
    if (g_use_tsc) {
        return __rdtsc();
    }
#endif
    return mono_ns();
}

/* Seconds from stamp `start` to now (never negative). */
static inline double
since(uint64_t start)
{
    int64_t d = (int64_t)(stamp() - start);
    return d > 0 ? (double)d * g_tick_s : 0.0;
}

#ifdef HAVE_TSC
/* A (counter, monotonic ns) pair read as close together as possible: of a few tries, the one
   whose counter reads around the clock read are nearest (a try the scheduler interrupted is far
   apart and loses). */
static void
tsc_pair(uint64_t *tsc, uint64_t *ns)
{
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < 5; i++) {
        uint64_t a = __rdtsc();
        uint64_t t = mono_ns();
        uint64_t b = __rdtsc();
        if (b - a < best) {
            best = b - a;
            *tsc = a + (b - a) / 2;
            *ns = t;
        }
    }
}

/* Use the counter if the kernel keeps time with it and it is invariant, at a rate measured over 0.5 ms against CLOCK_MONOTONIC
   (an error of about 1 part in 10^4). A rate outside 0.1-20 GHz means something is off: keep
   the clock. */
static void
tsc_setup(void)
{
    unsigned int a, b, c, d;
#ifdef __linux__
    /* The kernel checks at boot (and keeps checking) that the counters of all processors agree,
       and drops "tsc" as its clock source when they do not: use it only when the kernel does. */
    char source[32] = {0};
    int fd = open("/sys/devices/system/clocksource/clocksource0/current_clocksource", O_RDONLY);
    if (fd < 0) {
        return;
    }
    ssize_t n = read(fd, source, sizeof(source) - 1);
    close(fd);
    if (n < 3 || strncmp(source, "tsc", 3) != 0 || (source[3] != '\n' && source[3] != '\0')) {
        return;
    }
#endif
    if (!__get_cpuid(0x80000000u, &a, &b, &c, &d) || a < 0x80000007u) {
        return;
    }
    __get_cpuid(0x80000007u, &a, &b, &c, &d);
    if (!(d & (1u << 8))) {
        return;
    }
    uint64_t t0, n0, t1, n1;
    tsc_pair(&t0, &n0);
    do {
        tsc_pair(&t1, &n1);
    } while (n1 - n0 < 500000u);
    double ghz = (double)(t1 - t0) / (double)(n1 - n0);
    if (!(ghz > 0.1 && ghz < 20.0)) {
        return;
    }
    g_tsc_tick_s = 1e-9 / ghz;
    g_tick_s = g_tsc_tick_s;
    g_use_tsc = 1;
}
#endif

/* use_tsc(flag): time steps with the counter (if it is usable) or with the clock. For the
   benchmarks, which compare the two in one process, between runs of loops (a step timed across
   the switch would be wrong). Returns whether the counter is in use. */
static PyObject *
use_tsc(PyObject *Py_UNUSED(m), PyObject *flag)
{
    int on = PyObject_IsTrue(flag);
    if (on < 0) {
        return NULL;
    }
    g_use_tsc = on && g_tsc_tick_s > 0;
    g_tick_s = g_use_tsc ? g_tsc_tick_s : 1e-9;
    return PyBool_FromLong(g_use_tsc);
}

static PyObject *
step_clock(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(sd)", g_use_tsc ? "tsc" : "monotonic", g_tick_s);
}

/* The index of the first bound >= x (bisect_left), n (the +Inf bucket) if none. */
static inline Py_ssize_t
bucket(const double *bounds, Py_ssize_t n, double x)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (bounds[mid] < x) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

/* -- the exception in flight, across versions ------------------------------------------ */

static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) {
        PyException_SetTraceback(value, tb);
        Py_DECREF(tb);
    }
    Py_DECREF(type);
    return value;
#endif
}

static void
put_exception(PyObject *exc) /* steals exc */
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyObject *type = Py_NewRef((PyObject *)Py_TYPE(exc));
    PyObject *tb = PyException_GetTraceback(exc);
    PyErr_Restore(type, exc, tb);
#endif
}

/* ======================================================================================= */
/* TaskCounts: the base of _tasks.TaskStats                                                */

typedef struct {
    PyObject_HEAD
    long long created, ok, error, cancelled, gone, leaked, orphaned, unretrieved;
    PyObject *rows;  /* the loop's coroutine rows: dict label -> Row */
    PyObject *table; /* _timing.Table: table.row(rows, label) makes a missing row */
} CountsObject;

static PyTypeObject Counts_Type;

static int
Counts_traverse(PyObject *op, visitproc visit, void *arg)
{
    CountsObject *self = (CountsObject *)op;
    Py_VISIT(self->rows);
    Py_VISIT(self->table);
    return 0;
}

static int
Counts_clear(PyObject *op)
{
    CountsObject *self = (CountsObject *)op;
    Py_CLEAR(self->rows);
    Py_CLEAR(self->table);
    return 0;
}

static void
Counts_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    Counts_clear(op);
    tp->tp_free(op);
}

static PyMemberDef Counts_members[] = {
    {"created", T_LONGLONG, offsetof(CountsObject, created), 0, NULL},
    {"ok", T_LONGLONG, offsetof(CountsObject, ok), 0, NULL},
    {"error", T_LONGLONG, offsetof(CountsObject, error), 0, NULL},
    {"cancelled", T_LONGLONG, offsetof(CountsObject, cancelled), 0, NULL},
    {"gone", T_LONGLONG, offsetof(CountsObject, gone), 0, NULL},
    {"leaked", T_LONGLONG, offsetof(CountsObject, leaked), 0, NULL},
    {"orphaned", T_LONGLONG, offsetof(CountsObject, orphaned), 0, NULL},
    {"unretrieved", T_LONGLONG, offsetof(CountsObject, unretrieved), 0, NULL},
    {"_rows", T_OBJECT, offsetof(CountsObject, rows), 0, NULL},
    {"_table", T_OBJECT, offsetof(CountsObject, table), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Counts_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.TaskCounts",
    .tp_basicsize = sizeof(CountsObject),
    .tp_dealloc = Counts_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = Counts_traverse,
    .tp_clear = Counts_clear,
    .tp_members = Counts_members,
    .tp_new = PyType_GenericNew,
};

/* ======================================================================================= */
/* Row: the base of _timing.Row                                                            */

typedef struct {
    PyObject_HEAD
    long long count, errors, cancelled, steps, slow_steps, timed;
    double wall, max_wall, busy, max_step;
    long long wall_counts[MAX_BUCKETS + 1];
    long long busy_counts[MAX_BUCKETS + 1];
} RowObject;

static PyTypeObject Row_Type;

static PyObject *
Row_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (g_nduration < 0) {
        PyErr_SetString(PyExc_RuntimeError, "loopwatch._accel.configure() was not called");
        return NULL;
    }
    return PyType_GenericNew(type, args, kwds);
}

static void
Row_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    tp->tp_free(op);
}

static PyObject *
counts_get(const long long *counts, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLongLong(counts[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static int
counts_set(long long *counts, Py_ssize_t n, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "bucket counts cannot be deleted");
        return -1;
    }
    PyObject *seq = PySequence_Fast(value, "bucket counts must be a sequence of ints");
    if (seq == NULL) {
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "expected %zd bucket counts", n);
        return -1;
    }
    long long tmp[MAX_BUCKETS + 1];
    for (Py_ssize_t i = 0; i < n; i++) {
        tmp[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (tmp[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    memcpy(counts, tmp, sizeof(long long) * (size_t)n);
    return 0;
}

static PyObject *
Row_get_wall_counts(PyObject *op, void *Py_UNUSED(closure))
{
    return counts_get(((RowObject *)op)->wall_counts, g_nduration + 1);
}

static int
Row_set_wall_counts(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return counts_set(((RowObject *)op)->wall_counts, g_nduration + 1, value);
}

static PyObject *
Row_get_busy_counts(PyObject *op, void *Py_UNUSED(closure))
{
    return counts_get(((RowObject *)op)->busy_counts, g_nlatency + 1);
}

static int
Row_set_busy_counts(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return counts_set(((RowObject *)op)->busy_counts, g_nlatency + 1, value);
}

static PyGetSetDef Row_getset[] = {
    {"wall_counts", Row_get_wall_counts, Row_set_wall_counts, NULL, NULL},
    {"busy_counts", Row_get_busy_counts, Row_set_busy_counts, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Row_members[] = {
    {"count", T_LONGLONG, offsetof(RowObject, count), 0, NULL},
    {"errors", T_LONGLONG, offsetof(RowObject, errors), 0, NULL},
    {"cancelled", T_LONGLONG, offsetof(RowObject, cancelled), 0, NULL},
    {"steps", T_LONGLONG, offsetof(RowObject, steps), 0, NULL},
    {"slow_steps", T_LONGLONG, offsetof(RowObject, slow_steps), 0, NULL},
    {"timed", T_LONGLONG, offsetof(RowObject, timed), 0, NULL},
    {"wall", T_DOUBLE, offsetof(RowObject, wall), 0, NULL},
    {"max_wall", T_DOUBLE, offsetof(RowObject, max_wall), 0, NULL},
    {"busy", T_DOUBLE, offsetof(RowObject, busy), 0, NULL},
    {"max_step", T_DOUBLE, offsetof(RowObject, max_step), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Row_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.Row",
    .tp_basicsize = sizeof(RowObject),
    .tp_dealloc = Row_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_members = Row_members,
    .tp_getset = Row_getset,
    .tp_new = Row_new,
};

/* ======================================================================================= */
/* StepWatch: what the proxies of one loop share (the threshold, who hears of long steps)   */

typedef struct {
    PyObject_HEAD
    double threshold, half;
    PyObject *on_slow;
} WatchObject;

static PyTypeObject Watch_Type;

static int
Watch_init(PyObject *op, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"threshold", "on_slow", NULL};
    WatchObject *self = (WatchObject *)op;
    double threshold = Py_HUGE_VAL;
    PyObject *on_slow = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|dO:StepWatch", names, &threshold,
                                     &on_slow)) {
        return -1;
    }
    self->threshold = threshold;
    /* Steps of at least half the threshold are told to the watchdog, which may be following
       one of them as a block and can then use its exact duration. */
    self->half = threshold / 2.0;
    Py_XSETREF(self->on_slow, Py_NewRef(on_slow));
    return 0;
}

static int
Watch_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(((WatchObject *)op)->on_slow);
    return 0;
}

static int
Watch_clear(PyObject *op)
{
    Py_CLEAR(((WatchObject *)op)->on_slow);
    return 0;
}

static void
Watch_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    Watch_clear(op);
    tp->tp_free(op);
}

static PyMemberDef Watch_members[] = {
    {"threshold", T_DOUBLE, offsetof(WatchObject, threshold), 0, NULL},
    {"half", T_DOUBLE, offsetof(WatchObject, half), 0, NULL},
    {"on_slow", T_OBJECT, offsetof(WatchObject, on_slow), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Watch_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.StepWatch",
    .tp_doc = "StepWatch(threshold=inf, on_slow=None): what the proxies of one loop share.",
    .tp_basicsize = sizeof(WatchObject),
    .tp_dealloc = Watch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = Watch_traverse,
    .tp_clear = Watch_clear,
    .tp_members = Watch_members,
    .tp_init = Watch_init,
    .tp_new = PyType_GenericNew,
};

/* ======================================================================================= */
/* Timed: the proxy                                                                        */

typedef struct {
    PyObject_HEAD
    PyObject *coro;
    PyObject *cfg;   /* _timing.StepWatch, or NULL */
    PyObject *owner; /* the loop's TaskTracker, or NULL (@timed) */
    PyObject *sink;  /* the loop's TaskCounts (C accounting at the end), or NULL */
    PyObject *label; /* the coroutine's row, or NULL (not timed) */
    PyObject *code;  /* creation site: code object, or NULL */
    PyObject *stack; /* deeper creation stack (code, offset, ...), or NULL */
    PyObject *by;    /* what made the task, when asyncio or uvloop did (no creation site) */
    PyObject *route; /* the route template of the request the task serves, or NULL */
    PyObject *request; /* an aiohttp request whose route is read from it when asked, or NULL */
    double born, busy, max_step, watch;
    long long steps, slow_steps;
    uint64_t step_at; /* the stamp the step under way began at, 0 between steps */
    int lasti;
    char leaked, ended, timing;
    char cancelled; /* a CancelledError was thrown in: the owner hears of the end */
    PyObject *weakreflist; /* what get_coro() returns may be weakly referenced */
} TimedObject;

static PyTypeObject Timed_Type;

static double
attr_double(PyObject *obj, PyObject *name, double dflt)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return dflt;
    }
    double d = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return dflt;
    }
    return d;
}

/* A step longer than `watch`: a new maximum, or one the watchdog hears of. Called with no
   exception set. */
static void
long_step(TimedObject *self, double took)
{
    if (took > self->max_step) {
        self->max_step = took;
    }
    if (self->cfg == NULL || self->cfg == Py_None) {
        self->watch = self->max_step;
        return;
    }
    /* The compiled StepWatch is read directly (a task's first step always comes here, as its
       max_step was 0): no attribute lookups on the hot path. */
    int compiled = Py_IS_TYPE(self->cfg, &Watch_Type);
    double half = compiled ? ((WatchObject *)self->cfg)->half
                           : attr_double(self->cfg, s_half, Py_HUGE_VAL);
    self->watch = self->max_step < half ? self->max_step : half;
    if (took < half) {
        return;
    }
    double threshold = compiled ? ((WatchObject *)self->cfg)->threshold
                                : attr_double(self->cfg, s_threshold, Py_HUGE_VAL);
    if (took >= threshold) {
        self->slow_steps++;
    }
    PyObject *on_slow = compiled ? ((WatchObject *)self->cfg)->on_slow
                                 : PyObject_GetAttr(self->cfg, s_on_slow);
    if (on_slow == NULL) {
        if (!compiled) {
            PyErr_Clear();
        }
        return;
    }
    if (compiled) {
        Py_INCREF(on_slow);
    }
    if (on_slow != Py_None) {
        PyObject *a = PyFloat_FromDouble(took);
        PyObject *b = PyFloat_FromDouble(now_s());
        PyObject *r = NULL;
        if (a != NULL && b != NULL) {
            PyObject *args[2] = {a, b};
            r = PyObject_Vectorcall(on_slow, args, 2, NULL);
        }
        Py_XDECREF(a);
        Py_XDECREF(b);
        if (r == NULL) {
            PyErr_WriteUnraisable(on_slow);
        }
        Py_XDECREF(r);
    }
    Py_DECREF(on_slow);
}

/* The coroutine ended (exc: NULL for a return): count the task and time its coroutine, as
   TaskTracker.proxy_ended does. Called with no exception set; leaves none set. */
static void
account(TimedObject *self, CountsObject *sink, PyObject *exc)
{
    double wall = now_s() - self->born;
    sink->gone++;
    RowObject *row = NULL;
    if (self->label != NULL && self->label != Py_None && sink->rows != NULL &&
        PyDict_CheckExact(sink->rows)) {
        PyObject *found = PyDict_GetItemWithError(sink->rows, self->label);
        if (found != NULL) {
            Py_INCREF(found);
        }
        else if (!PyErr_Occurred() && sink->table != NULL) {
            PyObject *args[3] = {sink->table, sink->rows, self->label};
            found = PyObject_VectorcallMethod(s_row, args, 3, NULL);
        }
        if (found == NULL) {
            if (PyErr_Occurred()) {
                PyErr_WriteUnraisable((PyObject *)self);
            }
        }
        else if (PyObject_TypeCheck(found, &Row_Type)) {
            row = (RowObject *)found;
        }
        else {
            Py_DECREF(found);
        }
    }
    if (row != NULL) {
        row->count++;
    }
    if (exc == NULL) {
        sink->ok++;
    }
    else if (g_cancelled != NULL && PyErr_GivenExceptionMatches(exc, g_cancelled)) {
        /* The task becomes cancelled (one cancelled just as its coroutine returned is counted
           ok: the proxy cannot see that). */
        sink->cancelled++;
        if (row != NULL) {
            row->cancelled++;
        }
    }
    else {
        sink->error++;
        if (row != NULL) {
            row->errors++;
        }
    }
    if (row == NULL) {
        return;
    }
    row->wall += wall;
    if (wall > row->max_wall) {
        row->max_wall = wall;
    }
    row->wall_counts[bucket(g_duration, g_nduration, wall)]++;
    if (self->timing) {
        row->timed++;
        row->busy += self->busy;
        row->busy_counts[bucket(g_latency, g_nlatency, self->busy)]++;
        row->steps += self->steps;
        row->slow_steps += self->slow_steps;
        if (self->max_step > row->max_step) {
            row->max_step = self->max_step;
        }
    }
    Py_DECREF(row);
}

/* Tell the owner (a TaskTracker) one of the two things it hears about cancellations:
   cancel_arrived(proxy, what is thrown) or cancel_ended(proxy, exc or None). Called with no exception set;
   leaves none set (the tracker says its own failures). */
static void
tell_owner(TimedObject *self, PyObject *name, PyObject *exc)
{
    PyObject *owner = self->owner;
    if (owner == NULL || owner == Py_None) {
        return;
    }
    Py_INCREF(owner);
    PyObject *args[3] = {owner, (PyObject *)self, exc != NULL ? exc : Py_None};
    PyObject *r = PyObject_VectorcallMethod(name, args, 3, NULL);
    if (r == NULL) {
        PyErr_WriteUnraisable(owner);
    }
    Py_XDECREF(r);
    Py_DECREF(owner);
}

/* When a task labelled with a route ends, its busy time goes to the route's row: a Row (its
   count, busy and busy_counts) in g_route_rows, the running RequestTable's {route: Row}, set by
   set_route_rows. A route with no row yet (or no table) is g_request_end(route, busy)'s
   (integrations.request_busy: the table makes the row, within its cap); an error is
   unraisable. */
static PyObject *g_request_end, *g_route_rows;
static uint64_t g_rows_gen = 1; /* (a new one each set_route_rows: rows kept by aiohttp's cache) */

static PyObject *
set_request_end(PyObject *Py_UNUSED(m), PyObject *fn)
{
    Py_XSETREF(g_request_end, fn == Py_None ? NULL : Py_NewRef(fn));
    Py_RETURN_NONE;
}

static PyObject *
set_route_rows(PyObject *Py_UNUSED(m), PyObject *rows)
{
    if (rows != Py_None && !PyDict_CheckExact(rows)) {
        PyErr_SetString(PyExc_TypeError, "set_route_rows(rows: dict or None)");
        return NULL;
    }
    Py_XSETREF(g_route_rows, rows == Py_None ? NULL : Py_NewRef(rows));
    g_rows_gen++;
    Py_RETURN_NONE;
}

/* The busy time of one request into a route's Row. */
static inline void
observe_row(RowObject *r, double busy)
{
    r->count++;
    r->busy += busy;
    r->busy_counts[bucket(g_latency, g_nlatency, busy)]++;
}

/* The busy time of one request into its route's row: the row (borrowed), or NULL where the route
   has none. */
static PyObject *
observe_route(PyObject *rows, PyObject *route, double busy)
{
    PyObject *row = rows != NULL && PyUnicode_Check(route) ? PyDict_GetItem(rows, route) : NULL;
    if (row == NULL || !Py_IS_TYPE(row, &Row_Type) || g_nlatency < 0) {
        return NULL;
    }
    observe_row((RowObject *)row, busy);
    return row;
}

/* observe_request(rows, route, busy): the Python side's way in (a pure-Python proxy's end, or
   a route met for the first time): True if the route had a row. */
static PyObject *
observe_request(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "observe_request(rows: dict, route, busy)");
        return NULL;
    }
    double busy = PyFloat_AsDouble(args[2]);
    if (busy == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    return PyBool_FromLong(observe_route(args[0], args[1], busy) != NULL);
}

static PyObject *request_route(PyObject *request, Py_ssize_t *at);
static void request_route_failed(void);
static int front_observe(Py_ssize_t at, PyObject *route, double busy);
static void front_keep_row(Py_ssize_t at, PyObject *route, PyObject *row);

static void
request_end(TimedObject *self)
{
    PyObject *exc = NULL;
    Py_ssize_t at = -1; /* (where the route is in front of the labels' cache, with its row) */
    if (self->request != NULL) {
        /* An aiohttp request: its route read from its match (set once its router resolved it),
           now that it has ended; a route put on by hand comes first. */
        exc = take_exception();
        PyObject *request = self->request;
        self->request = NULL;
        if (self->route == NULL) {
            PyObject *found = request_route(request, &at);
            if (found == NULL) {
                request_route_failed();
            }
            else if (PyUnicode_Check(found)) {
                self->route = found;
            }
            else {
                Py_DECREF(found);
            }
        }
        Py_DECREF(request);
    }
    PyObject *route = self->route, *fn = g_request_end;
    if (route == NULL || route == Py_None || front_observe(at, route, self->busy)) {
        goto done;
    }
    PyObject *row = observe_route(g_route_rows, route, self->busy);
    if (row != NULL) {
        front_keep_row(at, route, row);
        goto done;
    }
    if (fn == NULL) {
        goto done;
    }
    if (exc == NULL) {
        exc = take_exception();
    }
    PyObject *busy = PyFloat_FromDouble(self->busy);
    if (busy != NULL) {
        Py_INCREF(fn);
        Py_INCREF(route);
        PyObject *args[2] = {route, busy};
        PyObject *r = PyObject_Vectorcall(fn, args, 2, NULL);
        if (r == NULL) {
            PyErr_WriteUnraisable(fn);
        }
        Py_XDECREF(r);
        Py_DECREF(route);
        Py_DECREF(fn);
        Py_DECREF(busy);
    }
    else {
        PyErr_WriteUnraisable((PyObject *)self);
    }
done:
    if (exc != NULL) {
        put_exception(exc);
    }
}

static void
ended(TimedObject *self, PyObject *exc)
{
    if (self->ended) {
        return;
    }
    self->ended = 1;
    if (self->route != NULL || self->request != NULL) {
        request_end(self);
    }
    if (self->cancelled && self->sink != NULL) {
        /* (Without a sink, proxy_ended hears of the end, and it tells cancel_ended itself.) */
        tell_owner(self, s_cancel_ended, exc);
    }
    if (self->sink != NULL) {
        Py_INCREF(self->sink);
        account(self, (CountsObject *)self->sink, exc);
        Py_DECREF(self->sink);
        return;
    }
    PyObject *owner = self->owner;
    if (owner == NULL || owner == Py_None) {
        return;
    }
    /* TaskTracker.proxy_ended takes a return as a StopIteration, as the Python proxy gives it. */
    PyObject *stop = exc == NULL ? PyObject_CallNoArgs(PyExc_StopIteration) : Py_NewRef(exc);
    if (stop == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
        return;
    }
    Py_INCREF(owner);
    PyObject *args[3] = {owner, (PyObject *)self, stop};
    PyObject *r = PyObject_VectorcallMethod(s_proxy_ended, args, 3, NULL);
    if (r == NULL) {
        PyErr_WriteUnraisable(owner);
    }
    Py_XDECREF(r);
    Py_DECREF(owner);
    Py_DECREF(stop);
}

/* A StopIteration out of throw() is the coroutine's return (exactly that type, as in Python). */
static inline int
is_return(PyObject *exc)
{
    return exc != NULL && Py_IS_TYPE(exc, (PyTypeObject *)PyExc_StopIteration);
}

/* After a timed step: count it, and if the coroutine ended, account for it. `status` is
   PYGEN_NEXT, PYGEN_RETURN, or PYGEN_ERROR with the exception set (which stays set). */
static inline void
step_done(TimedObject *self, uint64_t start, PySendResult status)
{
    self->step_at = 0;
    double took = since(start);
    self->busy += took;
    /* The watchdog hears of a long step (long_step) while `steps` still numbers this step: it
       tells a sample of this step from one of the next by that number. */
    if (status == PYGEN_NEXT) {
        if (took > self->watch) {
            long_step(self, took);
        }
        self->steps++;
        return;
    }
    PyObject *exc = status == PYGEN_ERROR ? take_exception() : NULL;
    if (took > self->watch) {
        long_step(self, took);
    }
    self->steps++;
    /* A StopIteration out of throw() is a return. */
    ended(self, is_return(exc) ? NULL : exc);
    if (exc != NULL) {
        put_exception(exc);
    }
}

/* After an untimed step (timing off): only the end matters. */
static void
untimed_end(TimedObject *self, PySendResult status)
{
    PyObject *exc = status == PYGEN_ERROR ? take_exception() : NULL;
    ended(self, is_return(exc) ? NULL : exc);
    if (exc != NULL) {
        put_exception(exc);
    }
}

/* A step of the coroutine: its own am_send when it has one (a coroutine does), else PyIter_Send. */
static inline PySendResult
send_to(PyObject *coro, PyObject *arg, PyObject **presult)
{
    PyAsyncMethods *am = Py_TYPE(coro)->tp_as_async;
    if (am != NULL && am->am_send != NULL) {
        return am->am_send(coro, arg, presult);
    }
    return PyIter_Send(coro, arg, presult);
}

static PySendResult
Timed_am_send(PyObject *op, PyObject *arg, PyObject **presult)
{
    TimedObject *self = (TimedObject *)op;
    if (!self->timing) {
        PySendResult status = send_to(self->coro, arg, presult);
        self->steps++;
        if (status != PYGEN_NEXT) {
            untimed_end(self, status);
        }
        return status;
    }
    uint64_t start = self->step_at = stamp();
    PySendResult status = send_to(self->coro, arg, presult);
    step_done(self, start, status);
    return status;
}

/* The return of a Python-level send/__next__: raise StopIteration(value). */
static PyObject *
stop_with(PyObject *value) /* steals value */
{
    if (value == Py_None) {
        PyErr_SetNone(PyExc_StopIteration);
    }
    else {
        PyObject *e = PyObject_CallOneArg(PyExc_StopIteration, value);
        if (e != NULL) {
            PyErr_SetObject(PyExc_StopIteration, e);
            Py_DECREF(e);
        }
    }
    Py_DECREF(value);
    return NULL;
}

/* A Python-level send or __next__ through an am_send: its return as StopIteration(value). */
static inline PyObject *
send_via(PySendResult (*am_send)(PyObject *, PyObject *, PyObject **), PyObject *op,
         PyObject *value)
{
    PyObject *result;
    if (am_send(op, value, &result) == PYGEN_RETURN) {
        return stop_with(result);
    }
    return result;
}

static PyObject *
Timed_iternext(PyObject *op)
{
    return send_via(Timed_am_send, op, Py_None);
}

static PyObject *
Timed_send(PyObject *op, PyObject *value)
{
    return send_via(Timed_am_send, op, value);
}

static PyObject *
Timed_throw(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    TimedObject *self = (TimedObject *)op;
    PyObject *stack[4];
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    stack[0] = self->coro;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        stack[i + 1] = args[i];
    }
    if (g_cancelled != NULL &&
        (PyObject_TypeCheck(args[0], (PyTypeObject *)g_cancelled) ||
         (PyType_Check(args[0]) &&
          PyType_IsSubtype((PyTypeObject *)args[0], (PyTypeObject *)g_cancelled)))) {
        /* The task's cancellation arrives: rare, and told before the coroutine sees it (the
           place it is suspended at is the place the cancellation reached). */
        self->cancelled = 1;
        tell_owner(self, s_cancel_arrived, args[0]);
    }
    if (!self->timing) {
        PyObject *result = PyObject_VectorcallMethod(s_throw, stack, (size_t)nargs + 1, NULL);
        self->steps++;
        if (result == NULL) {
            untimed_end(self, PYGEN_ERROR);
        }
        return result;
    }
    uint64_t start = self->step_at = stamp();
    PyObject *result = PyObject_VectorcallMethod(s_throw, stack, (size_t)nargs + 1, NULL);
    step_done(self, start, result != NULL ? PYGEN_NEXT : PYGEN_ERROR);
    return result;
}

/* The coroutine will never end on its own (closed midway, or the proxy is going away with it
   unfinished): its task is gone, counted once, with no outcome (it neither returned nor raised). */
static void
abandoned(TimedObject *self)
{
    if (self->ended) {
        return;
    }
    self->ended = 1;
    if (self->sink != NULL) {
        ((CountsObject *)self->sink)->gone++;
    }
}

static PyObject *
Timed_close(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    TimedObject *self = (TimedObject *)op;
    PyObject *r = PyObject_CallMethodNoArgs(self->coro, s_close);
    abandoned(self);
    return r;
}

static PyObject *
Timed_self(PyObject *op)
{
    return Py_NewRef(op);
}

static PyObject *
Timed_self_meth(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(op);
}

/* -- what a program reads from a coroutine --------------------------------------------- */

static PyObject *
forward(TimedObject *self, PyObject *name, PyObject *dflt)
{
    PyObject *v = PyObject_GetAttr(self->coro, name);
    if (v == NULL && dflt != NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return Py_NewRef(dflt);
    }
    return v;
}

static PyObject *
forward_bool(TimedObject *self, PyObject *name)
{
    PyObject *v = forward(self, name, Py_False);
    if (v == NULL) {
        return NULL;
    }
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t < 0 ? NULL : PyBool_FromLong(t);
}

#define FORWARD(fn, name, dflt)                                 \
    static PyObject *fn(PyObject *op, void *Py_UNUSED(closure)) \
    {                                                           \
        return forward((TimedObject *)op, name, dflt);          \
    }

FORWARD(get_name, s_name, NULL)
FORWARD(get_qualname, s_qualname, NULL)
FORWARD(get_cr_frame, s_cr_frame, Py_None)
FORWARD(get_cr_code, s_cr_code, Py_None)
FORWARD(get_cr_await, s_cr_await, Py_None)
FORWARD(get_cr_origin, s_cr_origin, Py_None)

static PyObject *
get_cr_running(PyObject *op, void *Py_UNUSED(closure))
{
    return forward_bool((TimedObject *)op, s_cr_running);
}

static PyObject *
get_cr_suspended(PyObject *op, void *Py_UNUSED(closure))
{
    return forward_bool((TimedObject *)op, s_cr_suspended);
}

static PyObject *
get_wrapped(PyObject *op, void *Py_UNUSED(closure))
{
    return Py_NewRef(((TimedObject *)op)->coro);
}

static PyObject *
get_sink(PyObject *op, void *Py_UNUSED(closure))
{
    PyObject *sink = ((TimedObject *)op)->sink;
    return Py_NewRef(sink ? sink : Py_None);
}

static int
set_sink(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    TimedObject *self = (TimedObject *)op;
    if (value != NULL && value != Py_None && !PyObject_TypeCheck(value, &Counts_Type)) {
        PyErr_SetString(PyExc_TypeError, "_sink must be a TaskCounts or None");
        return -1;
    }
    Py_XSETREF(self->sink, value == NULL || value == Py_None ? NULL : Py_NewRef(value));
    return 0;
}

static PyObject *
Timed_repr(PyObject *op)
{
    return PyObject_Repr(((TimedObject *)op)->coro);
}

/* -- life cycle -------------------------------------------------------------------------- */

static TimedObject *
timed_new(PyTypeObject *type, PyObject *coro, PyObject *cfg, PyObject *owner, PyObject *label)
{
    TimedObject *self = PyObject_GC_New(TimedObject, type);
    if (self == NULL) {
        return NULL;
    }
    self->coro = Py_NewRef(coro);
    self->cfg = cfg == NULL || cfg == Py_None ? NULL : Py_NewRef(cfg);
    self->owner = owner == NULL || owner == Py_None ? NULL : Py_NewRef(owner);
    self->sink = NULL;
    self->label = label == NULL || label == Py_None ? NULL : Py_NewRef(label);
    self->code = NULL;
    self->stack = NULL;
    self->by = NULL;
    self->route = NULL;
    self->request = NULL;
    self->born = now_s();
    self->busy = self->max_step = self->watch = 0.0;
    self->steps = self->slow_steps = 0;
    self->step_at = 0;
    self->lasti = 0;
    self->leaked = self->ended = self->cancelled = 0;
    self->timing = 1;
    self->weakreflist = NULL;
    PyObject_GC_Track(self);
    return self;
}

/* Timed(coro, cfg=None, owner=None, label=None), positional only. */
static PyObject *
Timed_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if ((kwnames != NULL && PyTuple_GET_SIZE(kwnames)) || nargs < 1 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "Timed(coro, cfg=None, owner=None, label=None)");
        return NULL;
    }
    return (PyObject *)timed_new((PyTypeObject *)type, args[0], nargs > 1 ? args[1] : NULL,
                                 nargs > 2 ? args[2] : NULL, nargs > 3 ? args[3] : NULL);
}

static PyObject *
Timed_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Timed takes no keyword arguments");
        return NULL;
    }
    return Timed_vectorcall((PyObject *)type, &PyTuple_GET_ITEM(args, 0),
                            (size_t)PyTuple_GET_SIZE(args), NULL);
}

static int
Timed_traverse(PyObject *op, visitproc visit, void *arg)
{
    TimedObject *self = (TimedObject *)op;
    /* Not visited: cfg, the runtime's StepWatch (it lives as long as loopwatch does and holds
       nothing of a task's), label (the coroutine's name, a str) and code (a code object): none
       can be part of a cycle through the proxy, and a collection walks every young proxy
       (these visits were about 100 of the 1,950 machine instructions a watched task costs on
       uvloop). Everything that can reach a task, its coroutine or its loop is visited. */
    Py_VISIT(self->coro);
    Py_VISIT(self->owner);
    Py_VISIT(self->sink);
    Py_VISIT(self->stack);
    Py_VISIT(self->by);
    Py_VISIT(self->route);
    Py_VISIT(self->request);
    return 0;
}

static int
Timed_clear(PyObject *op)
{
    TimedObject *self = (TimedObject *)op;
    /* coro stays until dealloc: repr() and the forwarded attributes read it. */
    Py_CLEAR(self->cfg);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->sink);
    Py_CLEAR(self->label);
    Py_CLEAR(self->code);
    Py_CLEAR(self->stack);
    Py_CLEAR(self->by);
    Py_CLEAR(self->route);
    Py_CLEAR(self->request);
    return 0;
}

static void
Timed_dealloc(PyObject *op)
{
    TimedObject *self = (TimedObject *)op;
    PyObject_GC_UnTrack(op);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs(op);
    }
    abandoned(self); /* a task destroyed while pending (however it was reported, or not) */
    Timed_clear(op);
    Py_CLEAR(self->coro);
    PyObject_GC_Del(op);
}

static PyMethodDef Timed_methods[] = {
    {"send", (PyCFunction)Timed_send, METH_O, NULL},
    {"throw", (PyCFunction)(void (*)(void))Timed_throw, METH_FASTCALL, NULL},
    {"close", Timed_close, METH_NOARGS, NULL},
    {"__await__", Timed_self_meth, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

/* busy, with the step under way counted to now: what a request held the loop is the difference of
   two reads made inside the task (at the request's start and end), each inside a step. */
static PyObject *
get_busy_now(PyObject *op, void *Py_UNUSED(closure))
{
    TimedObject *self = (TimedObject *)op;
    return PyFloat_FromDouble(self->busy + (self->step_at ? since(self->step_at) : 0.0));
}

static PyGetSetDef Timed_getset[] = {
    {"busy_now", get_busy_now, NULL, NULL, NULL},
    {"__name__", get_name, NULL, NULL, NULL},
    {"__qualname__", get_qualname, NULL, NULL, NULL},
    {"__wrapped__", get_wrapped, NULL, NULL, NULL},
    {"cr_frame", get_cr_frame, NULL, NULL, NULL},
    {"cr_code", get_cr_code, NULL, NULL, NULL},
    {"cr_await", get_cr_await, NULL, NULL, NULL},
    {"cr_running", get_cr_running, NULL, NULL, NULL},
    {"cr_suspended", get_cr_suspended, NULL, NULL, NULL},
    {"cr_origin", get_cr_origin, NULL, NULL, NULL},
    {"_sink", get_sink, set_sink, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* T_OBJECT members read NULL as None. */
static PyMemberDef Timed_members[] = {
    {"_coro", T_OBJECT, offsetof(TimedObject, coro), READONLY, NULL},
    {"_cfg", T_OBJECT, offsetof(TimedObject, cfg), 0, NULL},
    {"_owner", T_OBJECT, offsetof(TimedObject, owner), 0, NULL},
    {"_label", T_OBJECT, offsetof(TimedObject, label), 0, NULL},
    {"_code", T_OBJECT, offsetof(TimedObject, code), 0, NULL},
    {"_stack", T_OBJECT, offsetof(TimedObject, stack), 0, NULL},
    {"_by", T_OBJECT, offsetof(TimedObject, by), 0, NULL},
    {"_route", T_OBJECT, offsetof(TimedObject, route), 0, NULL},
    {"_request", T_OBJECT, offsetof(TimedObject, request), READONLY, NULL},
    {"_lasti", T_INT, offsetof(TimedObject, lasti), 0, NULL},
    {"_leaked", T_BOOL, offsetof(TimedObject, leaked), 0, NULL},
    {"_timing", T_BOOL, offsetof(TimedObject, timing), 0, NULL},
    {"_ended", T_BOOL, offsetof(TimedObject, ended), 0, NULL},
    {"born", T_DOUBLE, offsetof(TimedObject, born), 0, NULL},
    {"busy", T_DOUBLE, offsetof(TimedObject, busy), 0, NULL},
    {"max_step", T_DOUBLE, offsetof(TimedObject, max_step), 0, NULL},
    {"_watch", T_DOUBLE, offsetof(TimedObject, watch), 0, NULL},
    {"steps", T_LONGLONG, offsetof(TimedObject, steps), 0, NULL},
    {"slow_steps", T_LONGLONG, offsetof(TimedObject, slow_steps), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyAsyncMethods Timed_as_async = {
    .am_await = Timed_self,
    .am_send = Timed_am_send,
};

static PyTypeObject Timed_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.Timed",
    .tp_doc = "Drives one coroutine for its task and adds up the time each step holds the loop.",
    .tp_basicsize = sizeof(TimedObject),
    .tp_dealloc = Timed_dealloc,
    .tp_as_async = &Timed_as_async,
    .tp_repr = Timed_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = Timed_traverse,
    .tp_clear = Timed_clear,
    .tp_iter = Timed_self,
    .tp_iternext = Timed_iternext,
    .tp_methods = Timed_methods,
    .tp_members = Timed_members,
    .tp_getset = Timed_getset,
    .tp_new = Timed_new,
    .tp_vectorcall = Timed_vectorcall,
    .tp_weaklistoffset = offsetof(TimedObject, weakreflist),
};

/* ======================================================================================= */
/* Factory: the task factory's common case                                                 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *tracker;  /* the loop's TaskTracker: each proxy's _owner */
    PyObject *counts;   /* its TaskCounts */
    PyObject *watch;    /* its StepWatch */
    PyObject *fallback; /* the pure-Python factory: everything this does not do */
    PyObject *inner;    /* the factory loopwatch wraps, or NULL */
    PyObject *kw_in;    /* the last keyword names seen, and ("loop", *kw_in) */
    PyObject *kw_out;
    PyObject *boundary; /* the frame that called run_forever, while the loop runs, or NULL */
    int timing;
    int depth;
} FactoryObject;

#define MAX_KW 6

static PyObject *
code_of(PyObject *coro) /* new reference */
{
#if PY_VERSION_HEX >= 0x030C0000 && defined(Py_DEBUG)
    /* PyGen_GetCode asserts a generator; a coroutine shares the layout, but a debug build of
       CPython would abort. */
    return PyObject_GetAttr(coro, s_cr_code);
#elif PY_VERSION_HEX >= 0x030C0000
    return (PyObject *)PyGen_GetCode((PyGenObject *)coro);
#else
    return Py_NewRef((PyObject *)((PyGenObject *)coro)->gi_code);
#endif
}

/* Whether a file is the machinery's (asyncio, uvloop, loopwatch: Py_True), the program's
   (Py_False), or not yet known (NULL: the Python side decides and fills g_machinery). A small
   cache by the file name's address in front of the dictionary: a task's creation looks up two or
   three names, and most are the same few. The names it holds are kept alive, so an address is
   never another name's; forget_kinds() empties it when the Python side empties the dictionary. */
#define KIND_SLOTS 256
static struct {
    PyObject *name;
    PyObject *kind;
} g_kinds[KIND_SLOTS];

static inline PyObject * /* borrowed */
machinery_kind(PyObject *name)
{
    size_t i = ((uintptr_t)name >> 4) & (KIND_SLOTS - 1);
    if (g_kinds[i].name == name) {
        return g_kinds[i].kind;
    }
    PyObject *kind = PyDict_GetItemWithError(g_machinery, name);
    if (kind == Py_True || kind == Py_False) {
        PyObject *old = g_kinds[i].name;
        g_kinds[i].name = Py_NewRef(name);
        g_kinds[i].kind = kind;
        Py_XDECREF(old); /* a str: its deallocation runs no Python code */
    }
    return kind;
}

static PyObject *
forget_kinds(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    for (size_t i = 0; i < KIND_SLOTS; i++) {
        Py_CLEAR(g_kinds[i].name);
        g_kinds[i].kind = NULL;
    }
    Py_RETURN_NONE;
}

#ifdef LW_FRAME_WALK
/* The interpreter's frames, as PyEval_GetFrame() and PyFrame_GetBack() walk them (skipping the
   frames that have not started yet and 3.12's C-stack shims), with no frame object made. */
static inline _PyInterpreterFrame *
lw_first_complete(_PyInterpreterFrame *f)
{
    while (f != NULL && _PyFrame_IsIncomplete(f)) {
        f = f->previous;
    }
    return f;
}

static inline _PyInterpreterFrame *
lw_current_frame(void)
{
    PyThreadState *ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030D0000
    return lw_first_complete(ts->current_frame);
#else
    return lw_first_complete(ts->cframe->current_frame);
#endif
}

static inline PyObject * /* borrowed */
lw_code(_PyInterpreterFrame *f)
{
#if PY_VERSION_HEX >= 0x030D0000
    return f->f_executable;
#else
    return (PyObject *)f->f_code;
#endif
}
#endif

/* ("loop", *kwnames), cached for the last kwnames seen (names are interned). */
static PyObject *
task_kwnames(FactoryObject *self, PyObject *kwnames)
{
    if (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0) {
        return Py_NewRef(g_loop_kwnames);
    }
    Py_ssize_t n = PyTuple_GET_SIZE(kwnames);
    if (self->kw_in != NULL && PyTuple_GET_SIZE(self->kw_in) == n) {
        Py_ssize_t i = 0;
        while (i < n && PyTuple_GET_ITEM(self->kw_in, i) == PyTuple_GET_ITEM(kwnames, i)) {
            i++;
        }
        if (i == n) {
            return Py_NewRef(self->kw_out);
        }
    }
    PyObject *out = PyTuple_New(n + 1);
    if (out == NULL) {
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, Py_NewRef(s_loop));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyTuple_SET_ITEM(out, i + 1, Py_NewRef(PyTuple_GET_ITEM(kwnames, i)));
    }
    Py_XSETREF(self->kw_in, Py_NewRef(kwnames));
    Py_XSETREF(self->kw_out, Py_NewRef(out));
    return out;
}

/* The proxy this factory makes for the task of coro (counted as created): its label, its
   creation site (the frames now) and its loop's bookkeeping. NULL, with no exception set, where
   the Python factory decides: a coroutine that is not plain or not the program's, a file not
   known yet, the loop's own code making the task, deeper creation stacks. Used by the factory,
   and by aiohttp's hook for a task no factory sees (HOOK_REQUEST). */
static TimedObject *
factory_proxy(FactoryObject *self, PyObject *coro)
{
    if (!PyCoro_CheckExact(coro) || self->depth > 1 || g_machinery == NULL) {
        return NULL;
    }
    /* The label: the coroutine's qualified name, if it is the program's own. */
    PyObject *coro_code = code_of(coro);
    if (coro_code == NULL) {
        PyErr_Clear(); /* loopwatch's own trouble: the Python factory copes, or steps aside */
        return NULL;
    }
    PyObject *kind = machinery_kind(((PyCodeObject *)coro_code)->co_filename);
    if (kind != Py_False) {
        Py_DECREF(coro_code);
        PyErr_Clear();
        return NULL;
    }
    PyObject *label = Py_NewRef(((PyCodeObject *)coro_code)->co_qualname);
    Py_DECREF(coro_code);

    /* The creation site: the first frame of a file known not to be asyncio/uvloop/loopwatch;
       a file not yet in the cache, or the loop's own code running a callback, go the slow
       way. */
    PyObject *site = NULL;
    int lasti = 0;
#ifdef LW_FRAME_WALK
    _PyInterpreterFrame *f = lw_current_frame();
    while (f != NULL) {
        PyObject *code = lw_code(f);
        if (code == NULL || !PyCode_Check(code)) {
            Py_DECREF(label);
            return NULL;
        }
        kind = machinery_kind(((PyCodeObject *)code)->co_filename);
        if (kind == Py_False) {
            site = Py_NewRef(code);
            lasti = _PyInterpreterFrame_LASTI(f) * (int)sizeof(_Py_CODEUNIT);
            break;
        }
        if (kind != Py_True || code == g_handle_run || code == g_driver ||
            (self->boundary != NULL && (PyObject *)f->frame_obj == self->boundary)) {
            Py_DECREF(label);
            PyErr_Clear();
            return NULL;
        }
        f = lw_first_complete(f->previous);
    }
#else
    PyFrameObject *frame = PyEval_GetFrame();
    Py_XINCREF(frame);
    while (frame != NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        kind = machinery_kind(code->co_filename);
        if (kind == Py_False) {
            site = (PyObject *)code;
            lasti = PyFrame_GetLasti(frame);
            Py_DECREF(frame);
            break;
        }
        if (kind != Py_True || (PyObject *)code == g_handle_run ||
            (PyObject *)code == g_driver || (PyObject *)frame == self->boundary) {
            Py_DECREF(code);
            Py_DECREF(frame);
            Py_DECREF(label);
            PyErr_Clear();
            return NULL;
        }
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
#endif
    if (site == NULL) {
        Py_DECREF(label);
        return NULL;
    }

    TimedObject *proxy = timed_new(&Timed_Type, coro, self->watch, self->tracker, NULL);
    if (proxy == NULL) {
        Py_DECREF(label);
        Py_DECREF(site);
        PyErr_Clear();
        return NULL;
    }
    proxy->label = label;
    proxy->code = site;
    proxy->lasti = lasti;
    proxy->timing = (char)self->timing;
    proxy->sink = Py_NewRef(self->counts);
    ((CountsObject *)self->counts)->created++;
    return proxy;
}

static PyObject *
Factory_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FactoryObject *self = (FactoryObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs != 2 || nkw > MAX_KW) {
        goto slow;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        if (PyTuple_GET_ITEM(kwnames, i) == s_loop) {
            goto slow; /* Task(coro, loop=loop, loop=...) is Python's TypeError to raise */
        }
    }
    PyObject *loop = args[0], *coro = args[1];
    TimedObject *given = NULL, *proxy = NULL;
    if (Py_IS_TYPE(coro, &Timed_Type) && ((TimedObject *)coro)->steps == 0 &&
        ((TimedObject *)coro)->step_at == 0 && !((TimedObject *)coro)->ended) {
        TimedObject *t = (TimedObject *)coro;
        if (t->owner != NULL && t->owner == self->tracker) {
            /* Already this factory's proxy, made by aiohttp's hook (HOOK_REQUEST) for a task it
               expected no factory to see: the task runs it as it is. */
            proxy = (TimedObject *)Py_NewRef(coro);
        }
        else if (t->owner == NULL && t->request != NULL) {
            /* An aiohttp request's proxy (HOOK_REQUEST, carrying the request only), given to
               this factory after all (Python 3.11, or an aiohttp that makes its request tasks
               with create_task): the task's own proxy takes its coroutine and its request. */
            given = t;
            coro = given->coro;
        }
    }
    if (proxy == NULL) {
        proxy = factory_proxy(self, coro);
        if (proxy == NULL) {
            goto slow;
        }
        proxy->request = given != NULL ? Py_NewRef(given->request) : NULL;
    }
    CountsObject *counts = (CountsObject *)self->counts;

    PyObject *stack[MAX_KW + 2];
    PyObject *task;
    if (self->inner == NULL || self->inner == Py_None) {
        /* asyncio.Task(proxy, loop=loop, **kwargs) */
        PyObject *names = task_kwnames(self, kwnames);
        if (names == NULL) {
            if ((PyObject *)proxy != args[1]) { /* (a hook's stays whole for the Python one) */
                counts->created--;
                proxy->ended = 1; /* never a task: nothing to count */
            }
            Py_DECREF(proxy);
            PyErr_Clear();
            goto slow;
        }
        stack[0] = (PyObject *)proxy;
        stack[1] = loop;
        for (Py_ssize_t i = 0; i < nkw; i++) {
            stack[i + 2] = args[2 + i];
        }
        task = PyObject_Vectorcall(g_task_type, stack, 1, names);
        Py_DECREF(names);
    }
    else {
        /* inner(loop, proxy, **kwargs) */
        stack[0] = loop;
        stack[1] = (PyObject *)proxy;
        for (Py_ssize_t i = 0; i < nkw; i++) {
            stack[i + 2] = args[2 + i];
        }
        PyObject *inner = Py_NewRef(self->inner);
        task = PyObject_Vectorcall(inner, stack, 2, kwnames);
        Py_DECREF(inner);
    }
    if (task == NULL && proxy->steps == 0) {
        counts->created--; /* no task came of it */
        proxy->ended = 1;
        Py_CLEAR(proxy->request);
    }
    else if (given != NULL) {
        given->ended = 1; /* (the task's proxy has its coroutine and its request) */
        Py_CLEAR(given->request);
    }
    Py_DECREF(proxy);
    return task;

slow:
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
Factory_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *tracker, *counts, *watch, *fallback;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Factory takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!OO:Factory", &tracker, &Counts_Type, &counts, &watch,
                          &fallback)) {
        return NULL;
    }
    FactoryObject *self = (FactoryObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = Factory_vectorcall;
    self->tracker = Py_NewRef(tracker);
    self->counts = Py_NewRef(counts);
    self->watch = Py_NewRef(watch);
    self->fallback = Py_NewRef(fallback);
    self->inner = NULL;
    self->timing = 1;
    self->depth = 1;
    return (PyObject *)self;
}

static int
Factory_traverse(PyObject *op, visitproc visit, void *arg)
{
    FactoryObject *self = (FactoryObject *)op;
    Py_VISIT(self->tracker);
    Py_VISIT(self->counts);
    Py_VISIT(self->watch);
    Py_VISIT(self->fallback);
    Py_VISIT(self->inner);
    Py_VISIT(self->boundary);
    return 0;
}

static int
Factory_clear(PyObject *op)
{
    FactoryObject *self = (FactoryObject *)op;
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->watch);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->kw_in);
    Py_CLEAR(self->kw_out);
    Py_CLEAR(self->boundary);
    return 0;
}

static void
Factory_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    Factory_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyObject *
Factory_marker(PyObject *Py_UNUSED(op), void *Py_UNUSED(closure))
{
    Py_RETURN_TRUE;
}

static PyGetSetDef Factory_getset[] = {
    {"__loopwatch__", Factory_marker, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Factory_members[] = {
    {"inner", T_OBJECT, offsetof(FactoryObject, inner), 0, NULL},
    {"boundary", T_OBJECT, offsetof(FactoryObject, boundary), 0, NULL},
    {"timing", T_INT, offsetof(FactoryObject, timing), 0, NULL},
    {"depth", T_INT, offsetof(FactoryObject, depth), 0, NULL},
    {"fallback", T_OBJECT, offsetof(FactoryObject, fallback), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Factory_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.Factory",
    .tp_doc = "loopwatch's task factory (the common case compiled; the rest in Python).",
    .tp_basicsize = sizeof(FactoryObject),
    .tp_dealloc = Factory_dealloc,
    .tp_vectorcall_offset = offsetof(FactoryObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_traverse = Factory_traverse,
    .tp_clear = Factory_clear,
    .tp_members = Factory_members,
    .tp_getset = Factory_getset,
    .tp_new = Factory_new,
};




/* ======================================================================================= */
/* Thread: a thread of loopwatch's that can be joined at the OS level (before 3.13)       */

/* Thread(fn) starts fn() in a new OS thread, which takes the GIL as any thread does but is not
   one of the threading module's. join(timeout) waits for the OS thread to be gone (pthread),
   which _thread cannot do before Python 3.13: a fork right after then finds the process
   single-threaded, and says nothing (3.12's multi-threaded fork warning counts OS threads).

   On Linux "gone" takes one more step: a thread wakes its joiner as it exits, a moment before
   the kernel stops counting it among the process's threads (/proc/self/stat, which the warning
   reads). So join() also waits, briefly, until the kernel no longer knows the thread's id. */
#include <pthread.h>
#include <errno.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

typedef struct {
    PyObject_HEAD
    pthread_t tid;
    PyObject *fn;
    long ktid; /* the kernel's id of the thread (Linux), 0 before it runs */
    /* `joining`: a thread is inside pthread_*join_np for it, with the GIL released. Two joins of
       one thread at once are undefined (a second join of a joined thread reads freed memory):
       loops closed on several threads at once stop the same worker. Read and written with the
       GIL held only. */
    char started, joined, joining;
} ThreadObject;

static PyTypeObject Thread_Type;

static void *
thread_main(void *arg)
{
    ThreadObject *self = (ThreadObject *)arg;
#ifdef __linux__
    self->ktid = (long)syscall(SYS_gettid);
#endif
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallNoArgs(self->fn);
    if (r == NULL) {
        PyErr_WriteUnraisable(self->fn);
    }
    else {
        Py_DECREF(r);
    }
    Py_CLEAR(self->fn);
    Py_DECREF(self); /* the thread's own reference */
    PyGILState_Release(gil);
    return NULL;
}

static PyObject *
Thread_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fn;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Thread takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:Thread", &fn)) {
        return NULL;
    }
    ThreadObject *self = (ThreadObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->fn = Py_NewRef(fn);
    Py_INCREF(self); /* for the thread */
    int err = pthread_create(&self->tid, NULL, thread_main, self);
    if (err != 0) {
        Py_DECREF(self);
        Py_DECREF(self);
        errno = err;
        return PyErr_SetFromErrno(PyExc_RuntimeError);
    }
    self->started = 1;
    return (PyObject *)self;
}

static PyObject *
Thread_join(PyObject *op, PyObject *arg)
{
    ThreadObject *self = (ThreadObject *)op;
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (!self->started || self->joined) {
        Py_RETURN_TRUE;
    }
    if (self->joining) {
        /* Another thread is joining it: wait for that join to end (or our timeout). */
        double waited = 0.0;
        while (self->joining && waited < timeout) {
            Py_BEGIN_ALLOW_THREADS
            struct timespec pause = {0, 1000000};
            nanosleep(&pause, NULL);
            Py_END_ALLOW_THREADS
            waited += 0.001;
        }
        if (self->joined) {
            Py_RETURN_TRUE;
        }
        if (self->joining) {
            Py_RETURN_FALSE;
        }
        timeout -= waited; /* that join timed out: try ourselves with what is left */
        if (timeout < 0.0) {
            timeout = 0.0;
        }
    }
    self->joining = 1;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    double whole = floor(timeout);
    until.tv_sec += (time_t)whole;
    until.tv_nsec += (long)((timeout - whole) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec += 1;
        until.tv_nsec -= 1000000000L;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = pthread_timedjoin_np(self->tid, NULL, &until);
#ifdef __linux__
    long ktid = self->ktid; /* written by the thread, visible once joined */
    /* Until the kernel has released the thread (ESRCH): microseconds, bounded at ~50 ms. */
    pid_t pid = getpid();
    for (int i = 0; err == 0 && ktid > 0 && i < 2500; i++) {
        if (syscall(SYS_tgkill, pid, ktid, 0) != 0) {
            break;
        }
        struct timespec pause = {0, 20000};
        nanosleep(&pause, NULL);
    }
#endif
    Py_END_ALLOW_THREADS
    self->joining = 0;
    if (err == 0) {
        self->joined = 1;
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *
Thread_done(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    ThreadObject *self = (ThreadObject *)op;
    if (!self->started || self->joined) {
        Py_RETURN_TRUE;
    }
    if (self->joining) {
        Py_RETURN_FALSE; /* another thread's join decides */
    }
    int err = pthread_tryjoin_np(self->tid, NULL);
    if (err == 0) {
        self->joined = 1;
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static void
Thread_dealloc(PyObject *op)
{
    ThreadObject *self = (ThreadObject *)op;
    if (self->started && !self->joined && !self->joining) {
        pthread_detach(self->tid); /* never joined: its resources go when it ends */
    }
    Py_CLEAR(self->fn);
    Py_TYPE(op)->tp_free(op);
}

static PyMethodDef Thread_methods[] = {
    {"join", Thread_join, METH_O, "Wait up to timeout seconds for the OS thread to be gone."},
    {"done", Thread_done, METH_NOARGS, "Whether the OS thread is gone (joined)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Thread_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.Thread",
    .tp_basicsize = sizeof(ThreadObject),
    .tp_dealloc = Thread_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = Thread_methods,
    .tp_new = Thread_new,
};

/* ======================================================================================= */
/* MethodHook: a loop class's method, hooked with no Python frame of loopwatch's on the stack */

/* MethodHook(original, enter, leave) as a class attribute: called as loop.method(*args), it runs
   state = enter(loop); original(loop, *args); leave(state) (leave also when original raises).
   enter returns None for a loop loopwatch does not watch: then only original runs. Nothing of
   loopwatch's stays on the stack while original runs (run_forever: the whole run), so the
   program's stacks, tracebacks and cr_origin show the loop's own frames only. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *original;
    PyObject *enter;
    PyObject *leave;
} HookObject;

static PyTypeObject Hook_Type;

static PyObject *
Hook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    HookObject *self = (HookObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    }
    PyObject *state = PyObject_CallOneArg(self->enter, args[0]);
    if (state == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            return NULL; /* KeyboardInterrupt, SystemExit: the program's */
        }
        PyErr_WriteUnraisable(self->enter); /* loopwatch's own trouble: run unwatched */
        state = Py_NewRef(Py_None);
    }
    if (state == Py_None) {
        Py_DECREF(state);
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    }
    PyObject *result = PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    PyObject *exc = result == NULL ? take_exception() : NULL;
    PyObject *r = PyObject_CallOneArg(self->leave, state);
    Py_DECREF(state);
    if (r == NULL) {
        if (exc == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            Py_XDECREF(result);
            return NULL; /* the program's KeyboardInterrupt, raised as the run ended */
        }
        PyErr_WriteUnraisable(self->leave);
    }
    else {
        Py_DECREF(r);
    }
    if (exc != NULL) {
        put_exception(exc);
        return NULL;
    }
    return result;
}

static PyObject *
Hook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *original, *enter, *leave;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "MethodHook takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOO:MethodHook", &original, &enter, &leave)) {
        return NULL;
    }
    HookObject *self = (HookObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = Hook_vectorcall;
    self->original = Py_NewRef(original);
    self->enter = Py_NewRef(enter);
    self->leave = Py_NewRef(leave);
    return (PyObject *)self;
}

static int
Hook_traverse(PyObject *op, visitproc visit, void *arg)
{
    HookObject *self = (HookObject *)op;
    Py_VISIT(self->original);
    Py_VISIT(self->enter);
    Py_VISIT(self->leave);
    return 0;
}

static int
Hook_clear(PyObject *op)
{
    HookObject *self = (HookObject *)op;
    Py_CLEAR(self->original);
    Py_CLEAR(self->enter);
    Py_CLEAR(self->leave);
    return 0;
}

static void
Hook_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    Hook_clear(op);
    Py_TYPE(op)->tp_free(op);
}

/* Bound to the instance, as a function of the class is. */
static PyObject *
Hook_descr_get(PyObject *op, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(op);
    }
    return PyMethod_New(op, obj);
}

static PyObject *
Hook_forward(PyObject *op, void *closure)
{
    return PyObject_GetAttrString(((HookObject *)op)->original, (const char *)closure);
}

static PyObject *
Hook_wrapped(PyObject *op, void *Py_UNUSED(closure))
{
    return Py_NewRef(((HookObject *)op)->original);
}

static PyGetSetDef Hook_getset[] = {
    {"__wrapped__", Hook_wrapped, NULL, NULL, NULL},
    {"__loopwatch__", Factory_marker, NULL, NULL, NULL},
    {"__name__", Hook_forward, NULL, NULL, "__name__"},
    {"__qualname__", Hook_forward, NULL, NULL, "__qualname__"},
    {"__doc__", Hook_forward, NULL, NULL, "__doc__"},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Hook_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.MethodHook",
    .tp_basicsize = sizeof(HookObject),
    .tp_dealloc = Hook_dealloc,
    .tp_vectorcall_offset = offsetof(HookObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_traverse = Hook_traverse,
    .tp_clear = Hook_clear,
    .tp_getset = Hook_getset,
    .tp_descr_get = Hook_descr_get,
    .tp_new = Hook_new,
};

/* ======================================================================================= */
/* Pulse: the select hook of a watched asyncio loop (the compiled twin of _pulse.SelectPulse) */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *select; /* the selector's select (or what wrapped it before) */
    PyObject *prev;   /* _prev: the selector's own attribute before, put back on detach */
    PyObject *box;    /* deque of the watchdog's samples, emptied here */
    PyObject *failed; /* the exception that turned the pulse off, or NULL */
    PyObject *alarm;  /* the _alarm.Alarm pushed back every period, or NULL */
    PyObject *target; /* poll mode: the selector's epoll object this stands in for, else NULL */
    double woke, entered, busy, period, first_check, armed_at, lag_due, block_end, lag_sum;
    long long iterations;
    long long lag_counts[MAX_BUCKETS + 1];
    int alarm_fd;
    char active, idle, block_open;
} PulseObject;

static PyTypeObject Pulse_Type;
static PyObject *s_clear, *s_fd, *s_gi_frame, *s_gi_yieldfrom;

/* After a fork, in the parent: loopwatch's threads start again from the program's own thread
   once os.fork() has returned (Python 3.13 counts the process's threads, for its fork warning,
   after the at-fork hooks have run). g_resume is _threads.resume_paused. */
static PyObject *g_resume;
static int g_resume_pending;

static int
run_resume(void)
{
    if (!g_resume_pending || g_resume == NULL) {
        return 0;
    }
    g_resume_pending = 0;
    PyObject *r = PyObject_CallNoArgs(g_resume);
    if (r != NULL) {
        Py_DECREF(r);
        return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear(); /* resume_paused says its own failures */
        return 0;
    }
    return -1; /* KeyboardInterrupt, SystemExit: the program's, passed on */
}

static int
resume_trampoline(void *Py_UNUSED(arg))
{
    return run_resume();
}

static PyObject *
resume_later(PyObject *Py_UNUSED(m), PyObject *fn)
{
    Py_XSETREF(g_resume, Py_NewRef(fn));
    g_resume_pending = 1;
    if (Py_AddPendingCall(resume_trampoline, NULL) < 0) {
        /* The queue is full: the next pulse of a loop runs it. */
    }
    Py_RETURN_NONE;
}

/* The GIL, handed to loopwatch's threads when they wake (see _threads, "The GIL").
 *
 * A busy loop lets go of the GIL at every iteration (its select with a timeout of 0) and takes
 * it back at once. A thread waiting for the GIL is woken by each release, finds it taken again,
 * and waits again: each wake-up restarts CPython's switch interval, so the interval never forces
 * a switch, and the thread can starve for hundreds of milliseconds while every release of the
 * loop's thread pays a futex wake for it. So a thread of loopwatch's that wakes says so before
 * it asks for the GIL (g_waiting: wait_readable counts itself as its poll returns; g_rung: an
 * emitting thread rang the reporter; g_wake_due: a wake-up announced for a time), and a
 * loop's pulse that sees it lets go of the GIL and sleeps until that thread holds it
 * (g_woken changes), at most HANDOFF_MAX_S: the thread takes the GIL once, at once. */
#define HANDOFF_MAX_S 0.002
static double g_wake_due = INFINITY; /* read and written with the GIL held */
static int g_waiting;                /* atomic: threads back from poll, not yet holding the GIL */
static int g_rung;                   /* atomic: a thread was rung (want()) and has not said woken */
static unsigned long g_woken;        /* atomic: bumped with the GIL held, read without it */

static inline int
handoff_wanted(double now)
{
    return __atomic_load_n(&g_waiting, __ATOMIC_RELAXED) > 0 ||
           __atomic_load_n(&g_rung, __ATOMIC_RELAXED) || now >= g_wake_due;
}

static void
handoff(void)
{
    g_wake_due = INFINITY; /* a wake-up announced for a time is handed the GIL once */
    unsigned long seen = __atomic_load_n(&g_woken, __ATOMIC_ACQUIRE);
    int came;
    Py_BEGIN_ALLOW_THREADS
    double until = now_s() + HANDOFF_MAX_S;
    struct timespec pause = {0, 20000};
    while (!(came = __atomic_load_n(&g_woken, __ATOMIC_ACQUIRE) != seen) && now_s() < until) {
        nanosleep(&pause, NULL);
    }
    Py_END_ALLOW_THREADS
    if (!came) {
        /* Rung, and nobody came for the GIL: it was not waiting (a ring is a hint). */
        __atomic_store_n(&g_rung, 0, __ATOMIC_RELAXED);
    }
}

static void
mark_woken(void)
{
    g_wake_due = INFINITY;
    __atomic_add_fetch(&g_woken, 1, __ATOMIC_RELEASE);
}

static PyObject *
wake_due(PyObject *Py_UNUSED(m), PyObject *arg)
{
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (t < g_wake_due) {
        g_wake_due = t;
    }
    Py_RETURN_NONE;
}

static PyObject *
want(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&g_rung, 1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
woken(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&g_rung, 0, __ATOMIC_RELAXED);
    mark_woken();
    Py_RETURN_NONE;
}

/* After a fork, in the child: none of the parent's threads exist, so none waits for the GIL (a
   count left above 0 would hand the GIL to nobody at every iteration, 2 ms each). */
static PyObject *
reset_handoff(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&g_waiting, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_rung, 0, __ATOMIC_RELAXED);
    g_wake_due = INFINITY;
    Py_RETURN_NONE;
}

/* A thread of loopwatch's is being started: until it first holds the GIL it waits for it as a
   thread back from poll does (a new thread on a busy loop was starved for the whole run: 1,700
   futex wake-ups in 0.5 s, measured). */
static PyObject *
thread_starting(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    __atomic_add_fetch(&g_waiting, 1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

/* The thread announced by thread_starting() holds the GIL (or could not be started). */
static PyObject *
thread_started(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    if (__atomic_sub_fetch(&g_waiting, 1, __ATOMIC_RELAXED) < 0) {
        __atomic_store_n(&g_waiting, 0, __ATOMIC_RELAXED);
    }
    mark_woken();
    Py_RETURN_NONE;
}

/* loopwatch turned off: a wake-up rung or announced by a thread that has ended is forgotten (the
   next loop's pulse would wait 2 ms for a thread that never comes). Threads still between poll
   and the GIL keep their count. */
static PyObject *
forget_wakeups(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&g_rung, 0, __ATOMIC_RELAXED);
    g_wake_due = INFINITY;
    Py_RETURN_NONE;
}

static PyObject *
handoff_if_due(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    if (handoff_wanted(now_s())) {
        handoff();
    }
    Py_RETURN_NONE;
}

#ifdef __linux__
#include <poll.h>
#include <errno.h>
/* wait_readable(fds, timeout): poll() for reading, the GIL let go of; the fds ready (a list).
   timeout None: no limit. As poll returns, before the GIL is asked for, it counts itself in
   g_waiting. */
static PyObject *
wait_readable(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *seq, *timeout_obj;
    if (!PyArg_ParseTuple(args, "OO:wait_readable", &seq, &timeout_obj)) {
        return NULL;
    }
    int ms = -1;
    if (timeout_obj != Py_None) {
        double t = PyFloat_AsDouble(timeout_obj);
        if (t == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        ms = t <= 0 ? 0 : (t > 2e6 ? 2000000000 : (int)ceil(t * 1000.0));
    }
    PyObject *fast = PySequence_Fast(seq, "wait_readable: fds must be a sequence");
    if (fast == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > 64) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "wait_readable: at most 64 fds");
        return NULL;
    }
    struct pollfd pfd[64];
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (fd == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
        pfd[i].fd = (int)fd;
        pfd[i].events = POLLIN;
        pfd[i].revents = 0;
    }
    Py_DECREF(fast);
    int r, err;
    Py_BEGIN_ALLOW_THREADS
    r = poll(pfd, (nfds_t)n, ms);
    err = errno;
    __atomic_add_fetch(&g_waiting, 1, __ATOMIC_RELAXED);
    Py_END_ALLOW_THREADS
    __atomic_sub_fetch(&g_waiting, 1, __ATOMIC_RELAXED);
    mark_woken();
    if (r < 0) {
        if (err == EINTR) {
            return PyList_New(0);
        }
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *ready = PyList_New(0);
    if (ready == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n && r > 0; i++) {
        if (pfd[i].revents & (POLLNVAL)) {
            Py_DECREF(ready);
            PyErr_SetString(PyExc_ValueError, "wait_readable: a file descriptor is not open");
            return NULL;
        }
        if (pfd[i].revents) {
            PyObject *fd = PyLong_FromLong(pfd[i].fd);
            if (fd == NULL || PyList_Append(ready, fd) < 0) {
                Py_XDECREF(fd);
                Py_DECREF(ready);
                return NULL;
            }
            Py_DECREF(fd);
        }
    }
    return ready;
}
#endif

static void
pulse_fail(PulseObject *self)
{
    /* Called with an exception set: it turns the pulse off, and never reaches the program. */
    PyObject *exc = take_exception();
    if (self->failed == NULL) {
        self->failed = exc != NULL ? exc : Py_NewRef(Py_None);
    }
    else {
        Py_XDECREF(exc);
    }
    self->active = 0;
    self->idle = 0;
}

static void
pulse_arm(PulseObject *self, double now)
{
#ifdef __linux__
    if (self->alarm_fd < 0) {
        return;
    }
    struct itimerspec spec = {{0, 0}, {0, 0}};
    double whole = floor(self->first_check);
    spec.it_value.tv_sec = (time_t)whole;
    spec.it_value.tv_nsec = (long)((self->first_check - whole) * 1e9);
    if (spec.it_value.tv_sec == 0 && spec.it_value.tv_nsec == 0) {
        spec.it_value.tv_nsec = 1; /* 0/0 would disarm it */
    }
    if (timerfd_settime(self->alarm_fd, 0, &spec, NULL) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        self->alarm_fd = -1;
        pulse_fail(self);
        return;
    }
    self->armed_at = now;
#else
    (void)self;
    (void)now;
#endif
}

/* Entering the wait: this iteration's callbacks are done. */
static void
pulse_enter(PulseObject *self)
{
    double now = now_s();
    self->entered = now;
    self->busy += now - self->woke;
    self->idle = 1;
    if (now >= self->lag_due) {
        /* A virtual timer fell due while the loop ran callbacks: it runs now, that late. */
        double late = now - self->lag_due;
        self->lag_counts[bucket(g_latency, g_nlatency, late)]++;
        self->lag_sum += late;
        self->lag_due = now + self->period;
    }
    if (self->block_open) {
        self->block_open = 0;
        self->block_end = now;
    }
    if (self->box != NULL && PyObject_Size(self->box) > 0) {
        /* The watchdog's samples are let go of here, on the loop's own thread. */
        PyObject *r = PyObject_CallMethodNoArgs(self->box, s_clear);
        if (r == NULL) {
            pulse_fail(self);
            return;
        }
        Py_DECREF(r);
    }
    else if (PyErr_Occurred()) {
        pulse_fail(self);
    }
}

/* Leaving the wait: the next iteration's callbacks start. */
static void
pulse_leave(PulseObject *self)
{
    double now = now_s();
    self->idle = 0;
    self->woke = now;
    self->iterations++;
    if (now >= self->lag_due && self->period > 0) {
        /* Virtual timers that fell due while the loop waited ran on time. */
        long long missed = (long long)((now - self->lag_due) / self->period) + 1;
        self->lag_counts[0] += missed;
        self->lag_due += (double)missed * self->period;
    }
    if (now - self->armed_at >= self->period) {
        pulse_arm(self, now);
    }
    if (handoff_wanted(now)) {
        handoff();
    }
    if (g_resume_pending && !PyErr_Occurred() && run_resume() < 0) {
        return; /* the program's exception, left set: see Pulse_vectorcall */
    }
}

static PyObject *
Pulse_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PulseObject *self = (PulseObject *)op;
    if (!self->active) {
        return PyObject_Vectorcall(self->select, args, nargsf, kwnames);
    }
    pulse_enter(self);
    PyObject *select = Py_NewRef(self->select);
    PyObject *ready = PyObject_Vectorcall(select, args, nargsf, kwnames);
    Py_DECREF(select);
    if (self->active) {
        if (ready == NULL) {
            /* The program's exception (a signal handler's, say) goes on as it came. */
            PyObject *exc = take_exception();
            pulse_leave(self);
            if (PyErr_Occurred()) {
                pulse_fail(self);
            }
            put_exception(exc);
        }
        else {
            pulse_leave(self);
            if (PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                    Py_DECREF(ready); /* KeyboardInterrupt from resuming: the program's */
                    return NULL;
                }
                pulse_fail(self);
            }
        }
    }
    return ready;
}

static PyObject *
Pulse_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *select, *alarm = Py_None, *target = Py_None;
    double period, first_check;
    static char *kwlist[] = {"select", "period", "first_check", "alarm", "target", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Odd|OO:Pulse", kwlist, &select, &period,
                                     &first_check, &alarm, &target)) {
        return NULL;
    }
    if (g_nlatency < 0) {
        PyErr_SetString(PyExc_RuntimeError, "loopwatch._accel.configure() was not called");
        return NULL;
    }
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL) {
        return NULL;
    }
    PyObject *box = PyObject_CallMethod(collections, "deque", NULL);
    Py_DECREF(collections);
    if (box == NULL) {
        return NULL;
    }
    PulseObject *self = (PulseObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(box);
        return NULL;
    }
    self->vectorcall = Pulse_vectorcall;
    self->select = Py_NewRef(select);
    self->target = target != Py_None ? Py_NewRef(target) : NULL;
    self->prev = Py_NewRef(Py_None);
    self->box = box;
    self->failed = NULL;
    self->alarm = NULL;
    self->alarm_fd = -1;
    double now = now_s();
    self->woke = self->entered = now;
    self->period = period;
    self->first_check = first_check;
    self->armed_at = -1e9;
    self->lag_due = now + period;
    self->active = 1;
    if (alarm != Py_None) {
        PyObject *fd = PyObject_GetAttr(alarm, s_fd);
        if (fd == NULL) {
            Py_DECREF(self);
            return NULL;
        }
        self->alarm_fd = PyLong_AsLong(fd);
        Py_DECREF(fd);
        if (self->alarm_fd == -1 && PyErr_Occurred()) {
            Py_DECREF(self);
            return NULL;
        }
        self->alarm = Py_NewRef(alarm);
    }
    return (PyObject *)self;
}

static int
Pulse_traverse(PyObject *op, visitproc visit, void *arg)
{
    PulseObject *self = (PulseObject *)op;
    Py_VISIT(self->select);
    Py_VISIT(self->prev);
    Py_VISIT(self->box);
    Py_VISIT(self->failed);
    Py_VISIT(self->alarm);
    Py_VISIT(self->target);
    return 0;
}

static int
Pulse_clear(PyObject *op)
{
    PulseObject *self = (PulseObject *)op;
    Py_CLEAR(self->select);
    Py_CLEAR(self->prev);
    Py_CLEAR(self->box);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->alarm);
    Py_CLEAR(self->target);
    return 0;
}

static void
Pulse_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    Pulse_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyObject *
Pulse_get_alarm(PyObject *op, void *Py_UNUSED(closure))
{
    PyObject *alarm = ((PulseObject *)op)->alarm;
    return Py_NewRef(alarm != NULL ? alarm : Py_None);
}

/* Setting the alarm to None stops the pushes at once (before its descriptor is closed). */
static int
Pulse_set_alarm(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    PulseObject *self = (PulseObject *)op;
    if (value == NULL || value == Py_None) {
        self->alarm_fd = -1;
        Py_CLEAR(self->alarm);
        return 0;
    }
    PyObject *fd = PyObject_GetAttr(value, s_fd);
    if (fd == NULL) {
        return -1;
    }
    long n = PyLong_AsLong(fd);
    Py_DECREF(fd);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    Py_XSETREF(self->alarm, Py_NewRef(value));
    self->alarm_fd = (int)n;
    return 0;
}

/* (per-bucket counts, sum) of the lag: what _stats.Histogram keeps. */
static PyObject *
Pulse_get_lag(PyObject *op, void *Py_UNUSED(closure))
{
    PulseObject *self = (PulseObject *)op;
    PyObject *counts = counts_get(self->lag_counts, g_nlatency + 1);
    if (counts == NULL) {
        return NULL;
    }
    return Py_BuildValue("(Nd)", counts, self->lag_sum);
}

static PyObject *
Pulse_get_failed(PyObject *op, void *Py_UNUSED(closure))
{
    PyObject *failed = ((PulseObject *)op)->failed;
    return Py_NewRef(failed != NULL ? failed : Py_None);
}

static PyObject *
Pulse_release(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    PulseObject *self = (PulseObject *)op;
    if (self->box == NULL) {
        Py_RETURN_NONE;
    }
    return PyObject_CallMethodNoArgs(self->box, s_clear);
}

/* Poll mode: the pulse stands in for an epoll selector's epoll object (``selector._selector``),
   so the loop's wait is timed around ``epoll.poll``, a C call from C, and the selector's Python
   ``select`` keeps running inline in the loop's frame (wrapping ``select`` itself made CPython
   enter a new evaluation loop from C at every iteration: about 650 instructions). The other
   methods the selector calls go to the epoll object. */
static PyObject *
Pulse_poll(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return Pulse_vectorcall(op, args, (size_t)nargs, kwnames);
}

static PyObject *
pulse_forward(PyObject *op, const char *name, PyObject *const *args, Py_ssize_t nargs,
              PyObject *kwnames)
{
    PulseObject *self = (PulseObject *)op;
    if (self->target == NULL) {
        PyErr_SetString(PyExc_AttributeError, name);
        return NULL;
    }
    PyObject *method = PyObject_GetAttrString(self->target, name);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(method, args, (size_t)nargs, kwnames);
    Py_DECREF(method);
    return result;
}

#define PULSE_FORWARD(NAME)                                                                   \
    static PyObject *Pulse_##NAME(PyObject *op, PyObject *const *args, Py_ssize_t nargs,      \
                                  PyObject *kwnames)                                          \
    {                                                                                         \
        return pulse_forward(op, #NAME, args, nargs, kwnames);                                \
    }
PULSE_FORWARD(register)
PULSE_FORWARD(modify)
PULSE_FORWARD(unregister)
PULSE_FORWARD(fileno)
PULSE_FORWARD(close)
#undef PULSE_FORWARD

static PyObject *
Pulse_get_closed(PyObject *op, void *Py_UNUSED(closure))
{
    PulseObject *self = (PulseObject *)op;
    if (self->target == NULL) {
        PyErr_SetString(PyExc_AttributeError, "closed");
        return NULL;
    }
    return PyObject_GetAttrString(self->target, "closed");
}

static PyObject *
Pulse_get_target(PyObject *op, void *Py_UNUSED(closure))
{
    PyObject *target = ((PulseObject *)op)->target;
    return Py_NewRef(target != NULL ? target : Py_None);
}

#define PULSE_FWD_FLAGS (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef Pulse_methods[] = {
    {"release", Pulse_release, METH_NOARGS, "Let go of the watchdog's samples."},
    {"poll", (PyCFunction)(void (*)(void))Pulse_poll, PULSE_FWD_FLAGS,
     "Poll mode: the pulse, then the epoll object's poll."},
    {"register", (PyCFunction)(void (*)(void))Pulse_register, PULSE_FWD_FLAGS, NULL},
    {"modify", (PyCFunction)(void (*)(void))Pulse_modify, PULSE_FWD_FLAGS, NULL},
    {"unregister", (PyCFunction)(void (*)(void))Pulse_unregister, PULSE_FWD_FLAGS, NULL},
    {"fileno", (PyCFunction)(void (*)(void))Pulse_fileno, PULSE_FWD_FLAGS, NULL},
    {"close", (PyCFunction)(void (*)(void))Pulse_close, PULSE_FWD_FLAGS, NULL},
    {NULL, NULL, 0, NULL},
};
#undef PULSE_FWD_FLAGS

static PyGetSetDef Pulse_getset[] = {
    {"alarm", Pulse_get_alarm, Pulse_set_alarm, NULL, NULL},
    {"lag", Pulse_get_lag, NULL, NULL, NULL},
    {"failed", Pulse_get_failed, NULL, NULL, NULL},
    {"closed", Pulse_get_closed, NULL, NULL, NULL},
    {"target", Pulse_get_target, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Pulse_members[] = {
    {"select", T_OBJECT, offsetof(PulseObject, select), READONLY, NULL},
    {"_prev", T_OBJECT, offsetof(PulseObject, prev), 0, NULL},
    {"box", T_OBJECT, offsetof(PulseObject, box), READONLY, NULL},
    {"woke", T_DOUBLE, offsetof(PulseObject, woke), 0, NULL},
    {"entered", T_DOUBLE, offsetof(PulseObject, entered), 0, NULL},
    {"busy", T_DOUBLE, offsetof(PulseObject, busy), 0, NULL},
    {"period", T_DOUBLE, offsetof(PulseObject, period), 0, NULL},
    {"first_check", T_DOUBLE, offsetof(PulseObject, first_check), 0, NULL},
    {"armed_at", T_DOUBLE, offsetof(PulseObject, armed_at), 0, NULL},
    {"lag_due", T_DOUBLE, offsetof(PulseObject, lag_due), 0, NULL},
    {"block_end", T_DOUBLE, offsetof(PulseObject, block_end), 0, NULL},
    {"iterations", T_LONGLONG, offsetof(PulseObject, iterations), 0, NULL},
    {"active", T_BOOL, offsetof(PulseObject, active), 0, NULL},
    {"idle", T_BOOL, offsetof(PulseObject, idle), 0, NULL},
    {"block_open", T_BOOL, offsetof(PulseObject, block_open), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Pulse_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.Pulse",
    .tp_doc = "The select hook of a watched asyncio loop: a pulse at every iteration.",
    .tp_basicsize = sizeof(PulseObject),
    .tp_dealloc = Pulse_dealloc,
    .tp_vectorcall_offset = offsetof(PulseObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_traverse = Pulse_traverse,
    .tp_clear = Pulse_clear,
    .tp_methods = Pulse_methods,
    .tp_members = Pulse_members,
    .tp_getset = Pulse_getset,
    .tp_new = Pulse_new,
};

/* thread_frame(ident): the innermost frame of one thread, or None. Taken with the GIL held
   throughout: the other threads' frames in sys._current_frames() are all still running when they
   are let go of here, so none of their locals can be finalized on the calling thread. */
static PyObject *
thread_frame(PyObject *Py_UNUSED(m), PyObject *ident)
{
    PyObject *current = PySys_GetObject("_current_frames"); /* borrowed */
    if (current == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *frames = PyObject_CallNoArgs(current);
    if (frames == NULL) {
        return NULL;
    }
    PyObject *frame = PyDict_GetItemWithError(frames, ident);
    Py_XINCREF(frame);
    Py_DECREF(frames);
    if (frame == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return frame;
}

/* thread_context(ident): the contextvars.Context the thread with this ident runs in now (a
   running task's own context), or None. For Python 3.11, whose tasks do not give their context
   (Task.get_context() is 3.12+): read from the watchdog's thread while a task step blocks. The
   thread state's `context` field is public (cpython/pystate.h); the Context is immutable once
   made, so the reference taken here reads one whole state. */
static PyObject *
thread_context(PyObject *Py_UNUSED(m), PyObject *ident_obj)
{
    unsigned long ident = PyLong_AsUnsignedLong(ident_obj);
    if (ident == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    PyInterpreterState *interp = PyInterpreterState_Get();
    for (PyThreadState *t = PyInterpreterState_ThreadHead(interp); t != NULL;
         t = PyThreadState_Next(t)) {
        if (t->thread_id == ident) {
            if (t->context != NULL) {
                return Py_NewRef(t->context);
            }
            break;
        }
    }
    Py_RETURN_NONE;
}

/* ======================================================================================= */
/* the module                                                                              */

static int
read_bounds(PyObject *seq, double *out, Py_ssize_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "bucket bounds must be a sequence of floats");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(fast);
    if (size > MAX_BUCKETS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "at most %d bucket bounds", MAX_BUCKETS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    *n = size;
    return 0;
}

static PyObject *
configure(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *task_type, *cancelled, *machinery, *handle_run, *duration, *latency;
    if (!PyArg_ParseTuple(args, "OOO!OOO:configure", &task_type, &cancelled, &PyDict_Type,
                          &machinery, &handle_run, &duration, &latency)) {
        return NULL;
    }
    Py_ssize_t nd, nl;
    double d[MAX_BUCKETS], l[MAX_BUCKETS];
    if (read_bounds(duration, d, &nd) < 0 || read_bounds(latency, l, &nl) < 0) {
        return NULL;
    }
    if (g_nduration >= 0 && (nd != g_nduration || nl != g_nlatency)) {
        PyErr_SetString(PyExc_ValueError, "the number of buckets cannot change");
        return NULL;
    }
    memcpy(g_duration, d, sizeof(d));
    memcpy(g_latency, l, sizeof(l));
    g_nduration = nd;
    g_nlatency = nl;
    Py_XSETREF(g_task_type, Py_NewRef(task_type));
    Py_XSETREF(g_cancelled, Py_NewRef(cancelled));
    Py_XSETREF(g_machinery, Py_NewRef(machinery));
    Py_XSETREF(g_handle_run, Py_NewRef(handle_run));
    Py_RETURN_NONE;
}

static PyObject *
set_task_type(PyObject *Py_UNUSED(m), PyObject *type)
{
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "set_task_type needs a type");
        return NULL;
    }
    Py_XSETREF(g_task_type, Py_NewRef(type));
    Py_RETURN_NONE;
}

/* -- the class of the tasks the factory makes ------------------------------------------- */

/* asyncio's Task with get_coro() answering with the program's coroutine, not the proxy the task
   drives. Made at run time as a subclass of the Task the program's asyncio has; a compiled class
   costs a task less than a Python one (no subtype_dealloc, no instance dictionary checks). */

static PyObject *g_base_get_coro; /* the base class's get_coro (a method descriptor) */

static PyObject *
LwTask_get_coro(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *coro = PyObject_CallOneArg(g_base_get_coro, self);
    if (coro != NULL && Py_IS_TYPE(coro, &Timed_Type)) {
        Py_SETREF(coro, Py_NewRef(((TimedObject *)coro)->coro));
    }
    return coro;
}

/* The base's dealloc, straight: not subtype_dealloc, which a heap class gets by default and
   which costs every task. From 3.12 asyncio's Task is a heap type whose dealloc calls the
   finalizer and releases the instance's reference to its class, whatever the class. Before,
   it is a static type whose dealloc does neither for a subclass: LwTask_dealloc does both. */
static destructor g_base_dealloc;

#if PY_VERSION_HEX < 0x030C0000
static void
LwTask_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    /* The finalizer first (it runs once): if it resurrects the task, nothing is freed. */
    if (PyObject_CallFinalizerFromDealloc(self) < 0) {
        return;
    }
    g_base_dealloc(self);
    Py_DECREF(type);
}
#endif

static PyMethodDef LwTask_methods[] = {
    {"get_coro", LwTask_get_coro, METH_NOARGS, "The coroutine the task wraps (the program's)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot LwTask_slots[] = {
    {Py_tp_methods, LwTask_methods},
    {Py_tp_doc, "asyncio's Task; get_coro() returns the program's coroutine, not loopwatch's "
                "step-timing proxy."},
    {Py_tp_dealloc, NULL}, /* filled in by task_type() */
    {0, NULL},
};

static PyType_Spec LwTask_spec = {
    .name = "loopwatch._tasks.Task",
    .basicsize = 0,
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = LwTask_slots,
};

/* The interpreter calls a method descriptor of the C type straight (a specialized CALL) only
   for an instance of the exact class it belongs to: Task's done(), cancelled(), ... called on an
   instance of a subclass take the generic path, every call. The subclass gets its own
   descriptors of the same C functions, so that programs calling them (asyncio.gather does, per
   task) pay what they pay for asyncio's Task. Methods given their defining class (METH_METHOD)
   are left alone: they would be handed this class, which has no module state. */
static int
copy_methods(PyObject *type, PyObject *base)
{
    PyObject *attrs = PyObject_GetAttrString(base, "__dict__");
    if (attrs == NULL) {
        return -1;
    }
    PyObject *items = PyMapping_Items(attrs);
    Py_DECREF(attrs);
    if (items == NULL) {
        return -1;
    }
    PyObject *own = ((PyTypeObject *)type)->tp_dict;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(items); i++) {
        PyObject *name = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        PyObject *value = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
        if (!Py_IS_TYPE(value, &PyMethodDescr_Type)) {
            continue;
        }
        PyMethodDescrObject *descr = (PyMethodDescrObject *)value;
        if (descr->d_common.d_type != (PyTypeObject *)base ||
            (descr->d_method->ml_flags & METH_METHOD) || PyDict_Contains(own, name) != 0) {
            continue; /* Future's own, given its class, or get_coro (ours) */
        }
        PyObject *copy = PyDescr_NewMethod((PyTypeObject *)type, descr->d_method);
        if (copy == NULL || PyObject_SetAttr(type, name, copy) < 0) {
            rc = -1;
        }
        Py_XDECREF(copy);
    }
    Py_DECREF(items);
    return rc;
}

/* task_type(asyncio.Task) -> the subclass (made once). */
static PyObject *
task_type(PyObject *Py_UNUSED(m), PyObject *base)
{
    static PyObject *made;
    if (made != NULL) {
        return Py_NewRef(made);
    }
    if (!PyType_Check(base)) {
        PyErr_SetString(PyExc_TypeError, "task_type needs asyncio's Task class");
        return NULL;
    }
    PyObject *get_coro = PyObject_GetAttrString(base, "get_coro");
    if (get_coro == NULL) {
        return NULL;
    }
    g_base_dealloc = ((PyTypeObject *)base)->tp_dealloc;
    int heap = (((PyTypeObject *)base)->tp_flags & Py_TPFLAGS_HEAPTYPE) != 0;
#if PY_VERSION_HEX < 0x030C0000
    if (heap) {
        Py_DECREF(get_coro);
        PyErr_SetString(PyExc_TypeError, "task_type needs the compiled (static) Task before 3.12");
        return NULL;
    }
    LwTask_slots[2].pfunc = (void *)LwTask_dealloc;
#else
    if (!heap) {
        Py_DECREF(get_coro);
        PyErr_SetString(PyExc_TypeError, "task_type needs the compiled (heap) Task from 3.12");
        return NULL;
    }
    LwTask_slots[2].pfunc = (void *)g_base_dealloc;
#endif
    LwTask_spec.basicsize = (int)((PyTypeObject *)base)->tp_basicsize; /* nothing added */
    PyObject *type = PyType_FromSpecWithBases(&LwTask_spec, base);
    if (type == NULL) {
        Py_DECREF(get_coro);
        return NULL;
    }
    if (copy_methods(type, base) < 0) {
        Py_DECREF(type);
        Py_DECREF(get_coro);
        return NULL;
    }
    g_base_get_coro = get_coro;
    made = type;
    return Py_NewRef(type);
}

static PyObject *
set_driver(PyObject *Py_UNUSED(m), PyObject *code)
{
    Py_XSETREF(g_driver, code == Py_None ? NULL : Py_NewRef(code));
    Py_RETURN_NONE;
}

#if PY_VERSION_HEX < 0x030D0000 /* (the names 3.13 gave these) */
#define PyObject_GetOptionalAttr _PyObject_LookupAttr
static int
PyObject_HasAttrWithError(PyObject *obj, PyObject *name)
{
    PyObject *value;
    int found = _PyObject_LookupAttr(obj, name, &value);
    Py_XDECREF(value);
    return found;
}
#endif

#if PY_VERSION_HEX < 0x030D0000 /* (the 3.13 names of these) */
static int
PyDict_Pop(PyObject *dict, PyObject *key, PyObject **result)
{
    PyObject *value = PyDict_GetItemWithError(dict, key);
    *result = NULL;
    if (value == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(value);
    if (PyDict_DelItem(dict, key) < 0) {
        Py_DECREF(value);
        return -1;
    }
    *result = value;
    return 1;
}

static int
PyWeakref_GetRef(PyObject *ref, PyObject **result)
{
    PyObject *obj = PyWeakref_GetObject(ref);
    *result = NULL;
    if (obj == NULL) {
        return -1;
    }
    if (obj == Py_None) {
        return 0;
    }
    *result = Py_NewRef(obj);
    return 1;
}
#endif

/* -- the framework hooks: route labelling at routing time ------------------------------------ */

/* A hook is a callable put in a framework class's dict in place of one of its functions
   (integrations/_hooks.py): called as that function would be, as a method (a method descriptor,
   so a call through an instance makes no bound method), it does its part and calls the
   framework's own. Compiled, it has no frame: a framework's traceback has no line of
   loopwatch's, and it costs a request a few hundred instructions where a Python hook cost a few
   thousand. What it does by kind:

   HOOK_ROUTE    Starlette's Route.handle(self, scope, receive, send): the request's task is
                 labelled "METHOD {root_path less app_root_path}{self.path}" (an HTTP scope
                 only): on its compiled proxy (_route), which puts the task's busy time into the
                 route's row when it ends; a task without one goes to slow(route, task).
   HOOK_REQUEST  aiohttp's RequestHandler._handle_request(self, request, ...), the coroutine of
                 a request's task: put in a step-timing proxy that carries the request (_request).
                 aiohttp 3.10+ on Python 3.12+ makes that task eagerly, with no task factory:
                 with `slow` set (running_factory), the proxy is the one the running
                 loop's compiled Factory would make for the task (factory_proxy: label, creation
                 site, the loop's bookkeeping; its tracker's adopt(coro) where the factory would
                 step aside), so the task is tracked and timed as any other; on a loop not
                 watched, a bare proxy. Given to loopwatch's task factory after all (Python 3.11,
                 or 3.14's create_task), the factory takes its own proxy as it is, and makes one
                 for a bare one's coroutine and request. Nothing more is done per request until
                 the task ends: its route is read from the request's match then
                 (request_route), or when a finding asks.
   HOOK_TASK     The same with routes off: the factory's proxy only, no request, and the
                 coroutine as it is where the loop is not watched.

   A hook that fails calls failed(exc) (which puts the framework's functions back and says so
   once), never raises into the request, and calls the framework's own function all the same. */

enum { HOOK_ROUTE, HOOK_REQUEST, HOOK_TASK };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    PyObject *original;     /* the framework's own function */
    PyObject *current_task; /* asyncio.current_task, or (get_running_loop, {loop: task}) */
    PyObject *slow;         /* HOOK_ROUTE: label_request(route, task); HOOK_REQUEST and
                               HOOK_TASK: (asyncio._get_running_loop, tracker_of(loop)), or
                               None (Python 3.11: the task factory sees the task) */
    PyObject *failed;       /* failed(exc) */
    PyObject *watch;        /* HOOK_REQUEST: the proxies' StepWatch */
    PyObject *canonicals;   /* HOOK_ROUTE: {path: {method: label}} */
    PyObject *dict;
} FrameworkHookObject;

static PyTypeObject FrameworkHook_Type;
static PyObject *h__route, *h_coro, *h_type, *h_http, *h_method, *h_root_path, *h_app_root_path,
    *h_path, *h_route, *h_empty, *h_unmatched, *h__match_info, *h__method;

static void
hook_failed(FrameworkHookObject *self)
{
    PyObject *exc = take_exception();
    if (exc == NULL) {
        return;
    }
    PyObject *r = self->failed != NULL ? PyObject_CallOneArg(self->failed, exc) : NULL;
    if (r == NULL) {
        PyErr_Clear();
    }
    Py_XDECREF(r);
    Py_DECREF(exc);
}

/* The running task (a new reference), None (also outside a running loop), or NULL with an
   error set. */
static inline PyObject *
hook_task(FrameworkHookObject *self)
{
    if (PyTuple_CheckExact(self->current_task)) {
        /* (get_running_loop, asyncio's dict of current tasks by loop): Python 3.11, whose
           asyncio.current_task is a Python function, a frame per call. */
        PyObject *loop = PyObject_CallNoArgs(PyTuple_GET_ITEM(self->current_task, 0));
        if (loop == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) {
                return NULL;
            }
            PyErr_Clear();
            return Py_NewRef(Py_None);
        }
        PyObject *task = PyDict_GetItemWithError(PyTuple_GET_ITEM(self->current_task, 1), loop);
        Py_DECREF(loop);
        return task != NULL ? Py_NewRef(task) : PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    PyObject *task = PyObject_CallNoArgs(self->current_task);
    if (task == NULL && PyErr_ExceptionMatches(PyExc_RuntimeError)) {
        PyErr_Clear();
        return Py_NewRef(Py_None);
    }
    return task;
}

/* A scope's value (borrowed), dflt where it has none, NULL with an error set. */
static inline PyObject *
scope_get(PyObject *scope, PyObject *key, PyObject *dflt)
{
    PyObject *v = PyDict_GetItemWithError(scope, key);
    return v != NULL ? v : PyErr_Occurred() ? NULL : dflt;
}

static int
route_label(FrameworkHookObject *self, PyObject *route_obj, PyObject *scope)
{
    if (!PyDict_Check(scope)) {
        return 0;
    }
    PyObject *kind = scope_get(scope, h_type, Py_None);
    if (kind == NULL) {
        return -1;
    }
    if (!PyUnicode_CheckExact(kind) || PyUnicode_Compare(kind, h_http) != 0) {
        return 0;
    }
    /* (Held: reading the route's path may run Python code, which could change the scope.) */
    PyObject *method = Py_XNewRef(scope_get(scope, h_method, h_empty));
    PyObject *root = method ? Py_XNewRef(scope_get(scope, h_root_path, Py_None)) : NULL;
    int has_root = root != NULL ? PyObject_IsTrue(root) : -1;
    if (has_root < 0) {
        Py_XDECREF(method);
        Py_XDECREF(root);
        return -1;
    }
    PyObject *prefix;
    if (has_root) {
        /* A route inside a Mount: the mount's part of the path comes first. */
        PyObject *app_root = scope_get(scope, h_app_root_path, h_empty);
        Py_ssize_t cut = app_root != NULL ? PyObject_Length(app_root) : -1;
        prefix = cut >= 0 ? PySequence_GetSlice(root, cut, PY_SSIZE_T_MAX) : NULL;
    }
    else {
        prefix = Py_NewRef(h_empty);
    }
    Py_DECREF(root);
    PyObject *path = prefix != NULL ? PyObject_GetAttr(route_obj, h_path) : NULL;
    PyObject *route = NULL;
    if (path != NULL && !has_root && PyUnicode_CheckExact(path) && PyUnicode_CheckExact(method)) {
        /* The common case (no mount): the label made once per route path and method, kept in
           {path: {method: label}} (strings only, a few per route). */
        PyObject *by_method = PyDict_GetItemWithError(self->canonicals, path);
        route = by_method != NULL && PyDict_CheckExact(by_method)
                    ? PyDict_GetItemWithError(by_method, method)
                    : NULL;
        if (route != NULL) {
            Py_INCREF(route);
        }
        else if (!PyErr_Occurred()) {
            route = PyUnicode_FromFormat("%U %U", method, path);
            if (route != NULL && PyDict_GET_SIZE(self->canonicals) < 4096) {
                if (by_method == NULL) {
                    by_method = PyDict_New();
                    if (by_method == NULL || PyDict_SetItem(self->canonicals, path, by_method) < 0) {
                        Py_CLEAR(route);
                    }
                    Py_XDECREF(by_method); /* (the cache holds it) */
                }
                if (route != NULL && PyDict_Size(by_method) < 64 &&
                    PyDict_SetItem(by_method, method, route) < 0) {
                    Py_CLEAR(route);
                }
            }
        }
    }
    else if (path != NULL) {
        route = PyUnicode_FromFormat("%S %S%S", method, prefix, path);
    }
    Py_DECREF(method);
    Py_XDECREF(prefix);
    Py_XDECREF(path);
    PyObject *task = route != NULL ? hook_task(self) : NULL;
    if (task == NULL) {
        Py_XDECREF(route);
        return -1;
    }
    int status = 0;
    if (task != Py_None) {
        PyObject *proxy;
        if (PyObject_GetOptionalAttr(task, h_coro, &proxy) < 0) {
            status = -1;
        }
        else if (proxy != NULL && Py_IS_TYPE(proxy, &Timed_Type) &&
                 ((TimedObject *)proxy)->owner != NULL && ((TimedObject *)proxy)->owner != Py_None) {
            /* (The proxy puts the task's busy time into the route's row when it ends.) */
            Py_XSETREF(((TimedObject *)proxy)->route, Py_NewRef(route));
        }
        else {
            PyObject *args[2] = {route, task};
            PyObject *r = PyObject_Vectorcall(self->slow, args, 2, NULL);
            status = r != NULL ? 0 : -1;
            Py_XDECREF(r);
        }
        Py_XDECREF(proxy);
    }
    Py_DECREF(task);
    Py_DECREF(route);
    return status;
}

/* -- aiohttp: a request's route, read from its match ------------------------------------------

   Set by set_request_routes(canonical, failed) while aiohttp's hooks are on: canonical(match,
   route) is (the canonical path of the route aiohttp matched, "/users/{user_id}", or None for a
   request no route matched; the one method the route serves, or None for a route of any
   method), asked once per route object (a bare str or None is the path, of a route of any
   method); failed(exc) turns the hooks off and says so. The labels of each route object are
   kept in g_route_labels, {id(route): (weakref(route), {None: canonical, method: "METHOD
   canonical"}, its one method or None)}. */
static PyObject *g_route_canonical, *g_route_failed, *g_route_labels;

static void
request_route_failed(void)
{
    PyObject *exc = take_exception();
    PyObject *fn = Py_XNewRef(g_route_failed);
    if (exc != NULL && fn != NULL) {
        PyObject *r = PyObject_CallOneArg(fn, exc);
        if (r == NULL) {
            PyErr_Clear();
        }
        Py_XDECREF(r);
    }
    Py_XDECREF(fn);
    Py_XDECREF(exc);
}

/* An attribute that is a __slots__ slot of the object's type, read at its offset: the type's
   descriptor is looked up once (while the type is not changed); anything else, or an empty slot,
   is a plain getattr. Once per request, on the objects of one framework: the few types met are
   held. A new reference, or NULL with an error set. */
typedef struct {
    PyTypeObject *type;
    unsigned int version;
    Py_ssize_t offset;
} SlotAt;

static SlotAt g_at_method, g_at_route;

static PyObject *
slot_or_attr(PyObject *obj, PyObject *name, SlotAt *at)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (at->type != tp || at->version != tp->tp_version_tag || tp->tp_version_tag == 0) {
        PyObject *descr = _PyType_Lookup(tp, name); /* (borrowed) */
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX ||
            tp->tp_version_tag == 0) {
            return PyObject_GetAttr(obj, name);
        }
        Py_XSETREF(at->type, (PyTypeObject *)Py_NewRef(tp));
        at->version = tp->tp_version_tag;
        at->offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    PyObject *value = *(PyObject **)((char *)obj + at->offset);
    return value != NULL ? Py_NewRef(value) : PyObject_GetAttr(obj, name);
}

/* The labels last met, in front of g_route_labels, with the Row each goes to: a request's route
   found with a few loads. Direct-mapped, an entry holding its route object weakly. The label of
   a route that serves one method is keyed by the route alone (method NULL: the request's method
   is not read); one of a route of any method by the route and the request's method (the same
   str object request after request: aiohttp's parser gives each method as one). The row is that
   of g_route_rows as of generation `gen` (set_route_rows starts a new one). */
#define LABEL_SLOTS 64
typedef struct {
    PyObject *ref, *method, *label, *row;
    uint64_t gen;
} LabelAt;
static LabelAt g_label_at[LABEL_SLOTS];
static inline Py_ssize_t
label_slot(PyObject *route_obj, PyObject *method)
{
    return (Py_ssize_t)((((uintptr_t)route_obj >> 4) ^ ((uintptr_t)method >> 4)) % LABEL_SLOTS);
}

/* Whether entry `at` is the label of `route_obj` for `method` (NULL: of any request it serves). */
static inline int
front_holds(Py_ssize_t at, PyObject *route_obj, PyObject *method)
{
    LabelAt *e = &g_label_at[at];
    if (e->method != method || e->ref == NULL) {
        return 0;
    }
    PyObject *held;
    if (PyWeakref_GetRef(e->ref, &held) <= 0) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(held); /* (a route is compared by identity only: while its entry's ref holds) */
    return held == route_obj;
}

static void
front_put(Py_ssize_t at, PyObject *route_obj, PyObject *method, PyObject *label)
{
    PyObject *ref = PyWeakref_NewRef(route_obj, NULL);
    if (ref == NULL) {
        PyErr_Clear();
        return;
    }
    LabelAt *e = &g_label_at[at];
    Py_XSETREF(e->ref, ref);
    Py_XSETREF(e->method, Py_XNewRef(method));
    Py_XSETREF(e->label, Py_NewRef(label));
    Py_CLEAR(e->row);
}

/* A request's busy time into the row kept with its label at `at`: 1, or 0 where there is none
   (yet, or any more). */
static int
front_observe(Py_ssize_t at, PyObject *route, double busy)
{
    if (at < 0) {
        return 0;
    }
    LabelAt *e = &g_label_at[at];
    if (e->label != route || e->row == NULL || e->gen != g_rows_gen || g_nlatency < 0) {
        return 0;
    }
    observe_row((RowObject *)e->row, busy);
    return 1;
}

static void
front_keep_row(Py_ssize_t at, PyObject *route, PyObject *row)
{
    if (at >= 0 && g_label_at[at].label == route) {
        Py_XSETREF(g_label_at[at].row, Py_NewRef(row));
        g_label_at[at].gen = g_rows_gen;
    }
}

static void
forget_labels(void)
{
    for (Py_ssize_t i = 0; i < LABEL_SLOTS; i++) {
        Py_CLEAR(g_label_at[i].ref);
        Py_CLEAR(g_label_at[i].method);
        Py_CLEAR(g_label_at[i].label);
        Py_CLEAR(g_label_at[i].row);
    }
}

/* canonical(match, route)'s answer: the path (a new reference: a str, or None) and the one
   method the route serves (borrowed, or NULL). */
static PyObject *
canonical_answer(PyObject *answer, PyObject **only)
{
    *only = NULL;
    if (PyTuple_Check(answer) && PyTuple_GET_SIZE(answer) == 2) {
        PyObject *method = PyTuple_GET_ITEM(answer, 1);
        *only = PyUnicode_Check(method) ? method : NULL;
        return Py_NewRef(PyTuple_GET_ITEM(answer, 0));
    }
    return Py_NewRef(answer);
}

/* "METHOD canonical" for the route `route_obj` of a match, "METHOD <unmatched>" where no route
   matched; *at: where it was put in front (-1: it was not). */
static PyObject *
aiohttp_route_label(PyObject *method, PyObject *match, PyObject *route_obj, Py_ssize_t *at)
{
    Py_ssize_t by_method = label_slot(route_obj, method);
    if (front_holds(by_method, route_obj, method)) {
        *at = by_method;
        return Py_NewRef(g_label_at[by_method].label);
    }
    PyObject *route = NULL, *labels = NULL, *only = NULL, *key = PyLong_FromVoidPtr(route_obj);
    PyObject *cache = g_route_labels, *canonical_of = g_route_canonical;
    if (cache == NULL || canonical_of == NULL) {
        Py_XDECREF(key);
        return Py_NewRef(Py_None); /* (the hooks were turned off meanwhile) */
    }
    Py_INCREF(cache);
    Py_INCREF(canonical_of);
    PyObject *entry = key != NULL ? PyDict_GetItemWithError(cache, key) : NULL;
    if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 3) {
        PyObject *held;
        if (PyWeakref_GetRef(PyTuple_GET_ITEM(entry, 0), &held) > 0) {
            if (held == route_obj) {
                labels = PyTuple_GET_ITEM(entry, 1); /* (borrowed: the cache holds it) */
                only = PyTuple_GET_ITEM(entry, 2);
                Py_INCREF(labels);
                Py_INCREF(only);
            }
            Py_DECREF(held);
        }
    }
    if (labels != NULL) {
        route = PyDict_GetItemWithError(labels, method);
        if (route != NULL) {
            Py_INCREF(route);
        }
        else if (!PyErr_Occurred()) {
            PyObject *canonical = PyDict_GetItemWithError(labels, Py_None);
            route = canonical != NULL ? PyUnicode_FromFormat("%S %S", method, canonical) : NULL;
            if (route != NULL && PyDict_GET_SIZE(labels) < 64 &&
                PyDict_SetItem(labels, method, route) < 0) {
                Py_CLEAR(route);
            }
        }
    }
    else if (key != NULL && !PyErr_Occurred()) {
        PyObject *args[2] = {match, route_obj};
        PyObject *answer = PyObject_Vectorcall(canonical_of, args, 2, NULL);
        PyObject *canonical = answer != NULL ? canonical_answer(answer, &only) : NULL;
        only = Py_NewRef(only != NULL ? only : Py_None);
        if (canonical != NULL) {
            route = PyUnicode_FromFormat("%S %S", method,
                                         canonical == Py_None ? h_unmatched : canonical);
        }
        if (route != NULL && canonical != Py_None) {
            PyObject *ref = PyWeakref_NewRef(route_obj, NULL);
            if (ref == NULL) {
                PyErr_Clear(); /* (a route that cannot be weakly referenced: not cached) */
            }
            else {
                if (PyDict_GET_SIZE(cache) >= 4096) {
                    PyDict_Clear(cache);
                }
                labels = PyDict_New();
                PyObject *value = labels != NULL ? PyTuple_Pack(3, ref, labels, only) : NULL;
                if (value == NULL || PyDict_SetItem(labels, Py_None, canonical) < 0 ||
                    PyDict_SetItem(labels, method, route) < 0 ||
                    PyDict_SetItem(cache, key, value) < 0) {
                    Py_CLEAR(route);
                }
                Py_XDECREF(value);
                Py_DECREF(ref);
            }
        }
        Py_XDECREF(canonical);
        Py_XDECREF(answer);
    }
    if (route != NULL && labels != NULL) {
        /* (A label of a route the cache holds: put in front, by the route alone where the route
           serves this one method. A route no route matched, made each time, is not.) */
        int one = only != NULL && PyUnicode_Check(only) &&
                  PyUnicode_Compare(only, method) == 0;
        if (!one && PyErr_Occurred()) {
            PyErr_Clear();
        }
        *at = one ? label_slot(route_obj, NULL) : by_method;
        front_put(*at, route_obj, one ? NULL : method, route);
    }
    Py_XDECREF(labels);
    Py_XDECREF(only);
    Py_XDECREF(key);
    Py_DECREF(cache);
    Py_DECREF(canonical_of);
    return route;
}

/* The route of an aiohttp request (a new reference): its label once Application._handle has put
   its router's match on it (request._match_info), None before that (or for a request no
   application routed), NULL with an error set; *at: where the label is in front of the labels'
   cache, or -1. Reads the request's own attributes only: its match, and its method unless its
   route serves one method. */
static PyObject *
request_route(PyObject *request, Py_ssize_t *at)
{
    *at = -1;
    if (g_route_canonical == NULL) {
        return Py_NewRef(Py_None);
    }
    PyObject *match = NULL;
    if (PyObject_GetOptionalAttr(request, h__match_info, &match) < 0) {
        return NULL;
    }
    if (match == NULL || match == Py_None) {
        Py_XDECREF(match);
        return Py_NewRef(Py_None);
    }
    /* (The match's route: its slot, read without the property's frame where it has one.) */
    PyObject *route_obj = slot_or_attr(match, h__route, &g_at_route);
    if (route_obj == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        route_obj = PyObject_GetAttr(match, h_route);
    }
    if (route_obj == NULL) {
        Py_DECREF(match);
        return NULL;
    }
    PyObject *route = NULL;
    Py_ssize_t alone = label_slot(route_obj, NULL);
    if (front_holds(alone, route_obj, NULL)) {
        *at = alone;
        route = Py_NewRef(g_label_at[alone].label);
    }
    else {
        PyObject *method = slot_or_attr(request, h__method, &g_at_method);
        if (method == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            method = PyObject_GetAttr(request, h_method); /* (a request class without one) */
        }
        route = method != NULL ? aiohttp_route_label(method, match, route_obj, at) : NULL;
        Py_XDECREF(method);
    }
    Py_DECREF(route_obj);
    Py_DECREF(match);
    return route;
}

/* request_route(request): the Python side's way in (a finding about a request's task). */
static PyObject *
request_route_py(PyObject *Py_UNUSED(m), PyObject *request)
{
    Py_ssize_t at;
    return request_route(request, &at);
}

/* set_request_routes(canonical, failed), or (None, None): see above. */
static PyObject *
set_request_routes(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || (args[0] != Py_None && !PyCallable_Check(args[0])) ||
        (args[1] != Py_None && !PyCallable_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "set_request_routes(canonical, failed)");
        return NULL;
    }
    PyObject *labels = args[0] != Py_None ? PyDict_New() : NULL;
    if (args[0] != Py_None && labels == NULL) {
        return NULL;
    }
    forget_labels();
    Py_CLEAR(g_at_method.type);
    Py_CLEAR(g_at_route.type);
    Py_XSETREF(g_route_labels, labels);
    Py_XSETREF(g_route_canonical, args[0] != Py_None ? Py_NewRef(args[0]) : NULL);
    Py_XSETREF(g_route_failed, args[1] != Py_None ? Py_NewRef(args[1]) : NULL);
    Py_RETURN_NONE;
}

/* The running loop's compiled Factory, for aiohttp's hook: the last loop it was asked for (a
   weak reference) and its Factory, or None where that loop is not watched so; found again for
   another loop, and forgotten whenever a loop is attached or detached (forget_factories), so
   that nothing of a closed loop is kept. */
static PyObject *g_factory_loop, *g_factory;

static PyObject *
forget_factories(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(g_factory_loop);
    Py_CLEAR(g_factory);
    Py_RETURN_NONE;
}

/* find: (asyncio._get_running_loop, tracker_of(loop)). A new reference, or NULL (an exception
   set if finding it failed). */
static FactoryObject *
running_factory(PyObject *find)
{
    PyObject *loop = PyObject_CallNoArgs(PyTuple_GET_ITEM(find, 0));
    if (loop == NULL || loop == Py_None) {
        Py_XDECREF(loop);
        return NULL;
    }
    PyObject *known = NULL;
    if (g_factory_loop == NULL || PyWeakref_GetRef(g_factory_loop, &known) < 0 ||
        known != loop) {
        PyErr_Clear();
        PyObject *tracker = PyObject_CallOneArg(PyTuple_GET_ITEM(find, 1), loop);
        PyObject *factory = tracker == NULL      ? NULL
                            : tracker == Py_None ? Py_NewRef(Py_None)
                                                 : PyObject_GetAttr(tracker, s__compiled);
        Py_XDECREF(tracker);
        PyObject *ref = factory != NULL ? PyWeakref_NewRef(loop, NULL) : NULL;
        if (ref == NULL) {
            Py_XDECREF(factory);
            Py_XDECREF(known);
            Py_DECREF(loop);
            return NULL;
        }
        Py_XSETREF(g_factory_loop, ref);
        Py_XSETREF(g_factory, factory);
    }
    Py_XDECREF(known);
    Py_DECREF(loop);
    PyObject *factory = g_factory;
    return factory != NULL && Py_IS_TYPE(factory, &Factory_Type)
               ? (FactoryObject *)Py_NewRef(factory)
               : NULL;
}

/* The proxy the running loop's compiled Factory makes for coro's task (factory_proxy, or its
   tracker's adopt(coro) where that steps aside), for a task about to be made with no factory;
   NULL where the loop is not watched that way (an exception set if that failed). */
static TimedObject *
hook_adopt(PyObject *find, PyObject *coro)
{
    FactoryObject *f = running_factory(find);
    if (f == NULL) {
        return NULL;
    }
    TimedObject *proxy = factory_proxy(f, coro);
    if (proxy == NULL) {
        /* (A file not known yet, or deeper creation stacks: the Python factory's way, which
           learns the file for the next time.) */
        PyObject *r = PyObject_CallMethodOneArg(f->tracker, s_adopt, coro);
        if (r != NULL && Py_IS_TYPE(r, &Timed_Type) && ((TimedObject *)r)->owner == f->tracker) {
            proxy = (TimedObject *)r;
        }
        else {
            Py_XDECREF(r);
        }
    }
    Py_DECREF(f);
    return proxy;
}

static PyObject *
FrameworkHook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FrameworkHookObject *self = (FrameworkHookObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int plain = kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0;
    if (self->kind == HOOK_ROUTE) {
        if (plain && nargs == 4 && route_label(self, args[0], args[1]) < 0) {
            hook_failed(self);
        }
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    }
    /* HOOK_REQUEST, HOOK_TASK: the coroutine of the request's task, in the proxy the loop's
       factory would make for it, carrying the request (HOOK_REQUEST). */
    PyObject *coro = PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    if (coro == NULL || nargs < 1 || !PyCoro_CheckExact(coro)) {
        return coro;
    }
    int carry = self->kind == HOOK_REQUEST && nargs >= 2;
    TimedObject *timed = self->slow != Py_None ? hook_adopt(self->slow, coro) : NULL;
    if (timed == NULL && PyErr_Occurred()) {
        hook_failed(self);
    }
    if (timed == NULL && carry) {
        timed = timed_new(&Timed_Type, coro, self->watch, NULL, NULL);
        if (timed == NULL) {
            hook_failed(self);
        }
    }
    if (timed == NULL) {
        return coro; /* (the request runs as it would without loopwatch) */
    }
    if (carry) {
        Py_XSETREF(timed->request, Py_NewRef(args[1]));
    }
    Py_DECREF(coro);
    return (PyObject *)timed;
}

/* FrameworkHook(kind, original, current_task, slow, failed, watch): see above; the unused ones
   None. */
static PyObject *
FrameworkHook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int kind;
    PyObject *original, *current_task, *slow, *failed, *watch;
    if ((kwds != NULL && PyDict_GET_SIZE(kwds)) ||
        !PyArg_ParseTuple(args, "iOOOOO:FrameworkHook", &kind, &original, &current_task, &slow,
                          &failed, &watch)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "FrameworkHook takes no keyword arguments");
        }
        return NULL;
    }
    if (kind < HOOK_ROUTE || kind > HOOK_TASK || !PyCallable_Check(original) ||
        !(PyCallable_Check(current_task) ||
          (PyTuple_CheckExact(current_task) && PyTuple_GET_SIZE(current_task) == 2 &&
           PyCallable_Check(PyTuple_GET_ITEM(current_task, 0)) &&
           PyDict_CheckExact(PyTuple_GET_ITEM(current_task, 1)))) ||
        !PyCallable_Check(failed) || (kind == HOOK_ROUTE && !PyCallable_Check(slow)) ||
        (kind != HOOK_ROUTE && slow != Py_None &&
         !(PyTuple_CheckExact(slow) && PyTuple_GET_SIZE(slow) == 2 &&
           PyCallable_Check(PyTuple_GET_ITEM(slow, 0)) &&
           PyCallable_Check(PyTuple_GET_ITEM(slow, 1))))) {
        PyErr_SetString(PyExc_TypeError, "FrameworkHook: bad arguments for its kind");
        return NULL;
    }
    FrameworkHookObject *self = PyObject_GC_New(FrameworkHookObject, type);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = FrameworkHook_vectorcall;
    self->kind = kind;
    self->original = Py_NewRef(original);
    self->current_task = Py_NewRef(current_task);
    self->slow = Py_NewRef(slow);
    self->failed = Py_NewRef(failed);
    self->watch = Py_NewRef(watch);
    self->canonicals = PyDict_New();
    self->dict = NULL;
    if (self->canonicals == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
FrameworkHook_traverse(PyObject *op, visitproc visit, void *arg)
{
    FrameworkHookObject *self = (FrameworkHookObject *)op;
    Py_VISIT(self->original);
    Py_VISIT(self->current_task);
    Py_VISIT(self->slow);
    Py_VISIT(self->failed);
    Py_VISIT(self->watch);
    Py_VISIT(self->canonicals);
    Py_VISIT(self->dict);
    return 0;
}

static int
FrameworkHook_clear(PyObject *op)
{
    FrameworkHookObject *self = (FrameworkHookObject *)op;
    Py_CLEAR(self->original);
    Py_CLEAR(self->current_task);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->watch);
    Py_CLEAR(self->canonicals);
    Py_CLEAR(self->dict);
    return 0;
}

static void
FrameworkHook_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    FrameworkHook_clear(op);
    PyObject_GC_Del(op);
}

/* As a function in a class's dict: bound to an instance, as a function is. */
static PyObject *
FrameworkHook_get(PyObject *op, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(op);
    }
    return PyMethod_New(op, obj);
}

static PyTypeObject FrameworkHook_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.FrameworkHook",
    .tp_doc = "A framework function, wrapped to label each request's task by its route.",
    .tp_basicsize = sizeof(FrameworkHookObject),
    .tp_dealloc = FrameworkHook_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_traverse = FrameworkHook_traverse,
    .tp_clear = FrameworkHook_clear,
    .tp_descr_get = FrameworkHook_get,
    .tp_dictoffset = offsetof(FrameworkHookObject, dict),
    .tp_vectorcall_offset = offsetof(FrameworkHookObject, vectorcall),
    .tp_new = FrameworkHook_new,
};

/* -- the live view: a task's chain of awaits ------------------------------------------------ */

/* await_key(coro, frameless): the key of a chain of coroutines and generators each suspended in
   the next, outermost first: for each, the address of its frame's code object and its
   instruction offset (f_lasti), as two native words, in one bytes object (exact, hashed fast,
   and not a container the collector must follow). The chain ends at an object whose type is in
   the set frameless (a future), at a frame gone, or after 64 links. None where it reaches an
   awaitable of any other kind: the caller walks that chain itself. Called from any thread: it
   reads the coroutines as their own getters do, under the GIL, and keeps no frame. */
typedef struct {
    void *code;
    Py_ssize_t lasti;
} AwaitLink;

/* The C getters of cr_frame, cr_await, gi_frame and gi_yieldfrom, called straight (an
   attribute lookup costs more than the rest of a link of the walk); NULL: look the name up. */
static getter g_cr_frame, g_cr_await, g_gi_frame, g_gi_yieldfrom;

static getter
find_getter(PyTypeObject *type, const char *name)
{
    for (PyGetSetDef *def = type->tp_getset; def != NULL && def->name != NULL; def++) {
        if (strcmp(def->name, name) == 0) {
            return def->get;
        }
    }
    return NULL;
}

static inline PyObject *
get_link(PyObject *obj, getter get, PyObject *name)
{
    return get != NULL ? get(obj, NULL) : PyObject_GetAttr(obj, name);
}

#define AWAIT_LINKS 64

static int
await_links(PyObject *coro, PyObject *frameless, AwaitLink *links)
{
    int count = 0;
    PyObject *awaitable = Py_NewRef(coro);
    while (count < AWAIT_LINKS && awaitable != Py_None) {
        PyTypeObject *kind = Py_TYPE(awaitable);
        PyObject *frame, *next;
        if (kind == &PyCoro_Type) {
            frame = get_link(awaitable, g_cr_frame, s_cr_frame);
            next = frame != NULL ? get_link(awaitable, g_cr_await, s_cr_await) : NULL;
        }
        else if (kind == &PyGen_Type) {
            frame = get_link(awaitable, g_gi_frame, s_gi_frame);
            next = frame != NULL ? get_link(awaitable, g_gi_yieldfrom, s_gi_yieldfrom) : NULL;
        }
        else {
            int found = PySet_Contains(frameless, (PyObject *)kind);
            Py_DECREF(awaitable);
            return found < 0 ? -1 : found ? count : -2;
        }
        Py_DECREF(awaitable);
        if (frame == NULL || next == NULL) {
            Py_XDECREF(frame);
            return -1;
        }
        if (!PyFrame_Check(frame)) {
            Py_DECREF(frame);
            Py_DECREF(next);
            return count; /* (None: the coroutine has ended) */
        }
        PyCodeObject *code = PyFrame_GetCode((PyFrameObject *)frame);
        links[count].code = code;
        links[count].lasti = PyFrame_GetLasti((PyFrameObject *)frame);
        count++;
        Py_DECREF(code); /* (the frame holds it; the coroutine holds the frame) */
        Py_DECREF(frame);
        awaitable = next;
    }
    Py_DECREF(awaitable);
    return count;
}

static PyObject *
await_key(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyAnySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "await_key(coro, frameless: set)");
        return NULL;
    }
    AwaitLink links[AWAIT_LINKS];
    int count = await_links(args[0], args[1], links);
    if (count == -1) {
        return NULL;
    }
    if (count == -2) {
        Py_RETURN_NONE;
    }
    return PyBytes_FromStringAndSize((const char *)links, (Py_ssize_t)(count * sizeof(AwaitLink)));
}

/* live_table(tasks, current, owner, now, reader, gathering): the live view's rows of these tasks,
   as _live._loop makes them in Python: each task's row, each task named in the awaited_by of
   the tasks it waits on (directly, or through a gathering future, the type given), the busiest
   first and then by id. A row is made here for a task whose proxy belongs to owner and whose
   chain, name and creation site the reader's caches hold (the common case: a few dozen
   coroutine functions, thousands of tasks); any other task, and any cache miss, is the reader's
   own reader.task(task, running), which fills the caches for the tasks after it. */
static PyObject *g_row_template; /* {key: None} of a row, keys in order */
static PyObject *s__coro, *s_get_name, *s_cancelling, *s_task_method, *s_frameless, *s_chains,
    *s_names, *s_sites, *s__fut_waiter, *s__children, *k_task, *k_id, *k_coroutine, *k_state,
    *k_age_s, *k_created_at, *k_awaiting, *k_await_chain, *k_awaited_by, *k_steps, *k_busy_s,
    *k_waiting_s, *v_pending, *v_cancelling;

static PyObject *
micro_s(double seconds)
{
    return PyFloat_FromDouble(trunc(seconds * 1e6 + 0.5) / 1e6); /* as int(...) / 1e6 */
}

/* The kinds of rows met in one call: tasks suspended at the same instructions and made at the
   same place share their name, creation site, place and chain, found in the reader's caches
   once (three dictionary lookups, a bytes key and a tuple key) and kept as a row template with
   those three values in place: a task of a kind met before costs a copy of it and nine values.
   An open-addressed table keyed by the raw chain and site, compared exactly. */
typedef struct {
    Py_uhash_t hash; /* 0: an empty slot */
    int count;
    int site_lasti;
    void *site_code;
    AwaitLink *links; /* count links, owned */
    PyObject *row;    /* the template: coroutine, created_at and awaiting set */
    PyObject *places; /* the chain, copied into each row */
} RowKind;

typedef struct {
    RowKind *slots;
    Py_ssize_t size, used;
} RowKinds;

static Py_uhash_t
kind_hash(const AwaitLink *links, int count, void *site_code, int site_lasti)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a over the words */
    for (int i = 0; i < count; i++) {
        h = (h ^ (uint64_t)(uintptr_t)links[i].code) * 1099511628211ULL;
        h = (h ^ (uint64_t)links[i].lasti) * 1099511628211ULL;
    }
    h = (h ^ (uint64_t)(uintptr_t)site_code) * 1099511628211ULL;
    h = (h ^ (uint64_t)(unsigned)site_lasti) * 1099511628211ULL;
    h ^= h >> 29;
    return h ? (Py_uhash_t)h : 1;
}

static RowKind *
kind_slot(RowKinds *kinds, Py_uhash_t hash, const AwaitLink *links, int count, void *site_code,
          int site_lasti)
{
    size_t mask = (size_t)kinds->size - 1;
    for (size_t i = (size_t)hash & mask;; i = (i + 1) & mask) {
        RowKind *slot = &kinds->slots[i];
        if (slot->hash == 0 ||
            (slot->hash == hash && slot->count == count && slot->site_code == site_code &&
             slot->site_lasti == site_lasti &&
             memcmp(slot->links, links, (size_t)count * sizeof(AwaitLink)) == 0)) {
            return slot;
        }
    }
}

static void
kinds_clear(RowKinds *kinds)
{
    for (Py_ssize_t i = 0; i < kinds->size; i++) {
        if (kinds->slots[i].hash != 0) {
            PyMem_Free(kinds->slots[i].links);
            Py_XDECREF(kinds->slots[i].row);
            Py_XDECREF(kinds->slots[i].places);
        }
    }
    PyMem_Free(kinds->slots);
    kinds->slots = NULL;
    kinds->size = kinds->used = 0;
}

/* A new kind in its slot (the table grown first when half full), or NULL with an error set. */
static RowKind *
kind_add(RowKinds *kinds, Py_uhash_t hash, const AwaitLink *links, int count, void *site_code,
         int site_lasti, PyObject *row, PyObject *places)
{
    if ((kinds->used + 1) * 2 > kinds->size) {
        Py_ssize_t size = kinds->size ? kinds->size * 2 : 64;
        RowKind *slots = PyMem_Calloc((size_t)size, sizeof(RowKind));
        if (slots == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        RowKinds grown = {slots, size, kinds->used};
        for (Py_ssize_t i = 0; i < kinds->size; i++) {
            RowKind *old = &kinds->slots[i];
            if (old->hash != 0) {
                *kind_slot(&grown, old->hash, old->links, old->count, old->site_code,
                           old->site_lasti) = *old;
            }
        }
        PyMem_Free(kinds->slots);
        *kinds = grown;
    }
    AwaitLink *copy = PyMem_Malloc((size_t)count * sizeof(AwaitLink));
    if (copy == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(copy, links, (size_t)count * sizeof(AwaitLink));
    RowKind *slot = kind_slot(kinds, hash, links, count, site_code, site_lasti);
    *slot = (RowKind){hash, count, site_lasti, site_code, copy, Py_NewRef(row), Py_NewRef(places)};
    kinds->used++;
    return slot;
}


/* What the table keeps of each task's row for the awaited_by pass and the order. */
typedef struct {
    PyObject *task;       /* borrowed from the list of tasks */
    PyObject *row;        /* owned */
    PyObject *name;       /* borrowed from the row */
    PyObject *awaited_by; /* borrowed from the row */
    double busy;          /* the row's busy_s */
} TableItem;

static int
row_template(PyObject **keys)
{
    if (g_row_template != NULL) {
        return 0;
    }
    g_row_template = PyDict_New();
    for (int i = 0; i < 12 && g_row_template != NULL; i++) {
        if (PyDict_SetItem(g_row_template, keys[i], Py_None) < 0) {
            Py_CLEAR(g_row_template);
        }
    }
    return g_row_template != NULL ? 0 : -1;
}

/* The kind of a task's row, from the table or the reader's caches (then added to the table):
   NULL with no error set for a miss (the reader's turn), NULL with an error set for a failure. */
static RowKind *
live_kind(TimedObject *proxy, PyObject *frameless, PyObject *chains, PyObject *names,
          PyObject *sites, RowKinds *kinds)
{
    AwaitLink links[AWAIT_LINKS];
    int count = await_links(proxy->coro, frameless, links);
    if (count <= 0) {
        PyErr_Clear();
        return NULL;
    }
    void *site_code = proxy->code;
    int site_lasti = proxy->lasti;
    Py_uhash_t hash = kind_hash(links, count, site_code, site_lasti);
    if (kinds->size) {
        RowKind *slot = kind_slot(kinds, hash, links, count, site_code, site_lasti);
        if (slot->hash != 0) {
            return slot;
        }
    }
    PyObject *walked =
        PyBytes_FromStringAndSize((const char *)links, (Py_ssize_t)(count * sizeof(AwaitLink)));
    PyObject *found = walked ? PyDict_GetItemWithError(chains, walked) : NULL;
    Py_XDECREF(walked);
    if (found == NULL || !PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2 ||
        !PyList_Check(PyTuple_GET_ITEM(found, 1))) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *code_id = PyLong_FromVoidPtr(links[0].code);
    PyObject *name = code_id ? PyDict_GetItemWithError(names, code_id) : NULL;
    Py_XDECREF(code_id);
    PyObject *site_key = Py_BuildValue("(Ni)", PyLong_FromVoidPtr(site_code), site_lasti);
    PyObject *site = site_key ? PyDict_GetItemWithError(sites, site_key) : NULL;
    Py_XDECREF(site_key);
    if (name == NULL || site == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *row = PyDict_Copy(g_row_template);
    if (row == NULL || PyDict_SetItem(row, k_coroutine, name) < 0 ||
        PyDict_SetItem(row, k_created_at, site) < 0 ||
        PyDict_SetItem(row, k_awaiting, PyTuple_GET_ITEM(found, 0)) < 0) {
        Py_XDECREF(row);
        return NULL;
    }
    RowKind *slot = kind_add(kinds, hash, links, count, site_code, site_lasti, row,
                             PyTuple_GET_ITEM(found, 1));
    Py_DECREF(row);
    return slot;
}

/* The row of one task (into item), 1; 0 for a miss (the reader's turn), with no error set. */
static int
live_row(TableItem *item, PyObject *owner, double now, PyObject *frameless, PyObject *chains,
         PyObject *names, PyObject *sites, RowKinds *kinds)
{
    PyObject *task = item->task, *row = NULL;
    PyObject *proxy_obj = PyObject_GetAttr(task, s__coro);
    if (proxy_obj == NULL) {
        PyErr_Clear();
        return 0;
    }
    TimedObject *proxy = (TimedObject *)proxy_obj;
    if (!Py_IS_TYPE(proxy_obj, &Timed_Type) || proxy->owner != owner || proxy->coro == NULL ||
        (proxy->stack != NULL && proxy->stack != Py_None) || proxy->code == NULL ||
        proxy->code == Py_None) {
        goto done;
    }
    RowKind *kind = live_kind(proxy, frameless, chains, names, sites, kinds);
    if (kind == NULL) {
        PyErr_Clear();
        goto done;
    }
    /* (A task class of the program's may run Python code here, and raise: its row is then the
       reader's, which raises what it raises. No call is made with an exception set.) */
    PyObject *task_name = PyObject_CallMethodNoArgs(task, s_get_name);
    PyObject *cancelling = task_name ? PyObject_CallMethodNoArgs(task, s_cancelling) : NULL;
    int state = cancelling ? PyObject_IsTrue(cancelling) : -1;
    Py_XDECREF(cancelling);
    if (state < 0) {
        PyErr_Clear();
        Py_XDECREF(task_name);
        goto done;
    }
    PyObject *places = PyList_GetSlice(kind->places, 0, PY_SSIZE_T_MAX);
    PyObject *awaited_by = PyList_New(0);
    /* A row holds strings, numbers and these two lists of strings: nothing that can make a
       cycle. Untracked (the lists here, the row once filled), the collector neither walks
       30,000 new containers per snapshot of 10,000 tasks nor counts them toward a full
       collection of the program's heap. A container the caller puts in a row tracks it again. */
    if (places != NULL) {
        PyObject_GC_UnTrack(places);
    }
    if (awaited_by != NULL) {
        PyObject_GC_UnTrack(awaited_by);
    }
    double age = now - proxy->born, busy = proxy->busy;
    double busy_s = trunc(busy * 1e6 + 0.5) / 1e6;
    PyObject *values[9] = {
        task_name,
        PyLong_FromVoidPtr(task),
        Py_NewRef(state ? v_cancelling : v_pending),
        micro_s(age),
        places,
        Py_XNewRef(awaited_by),
        PyLong_FromLongLong(proxy->steps),
        PyFloat_FromDouble(busy_s),
        age > busy ? micro_s(age - busy) : PyFloat_FromDouble(0.0),
    };
    static PyObject **keys[9] = {&k_task,        &k_id,          &k_state,
                                 &k_age_s,       &k_await_chain, &k_awaited_by,
                                 &k_steps,       &k_busy_s,      &k_waiting_s};
    /* A copy of the kind's template (a copy of its table, where twelve insertions would grow
       it twice), whose other values are then replaced. */
    row = PyDict_Copy(kind->row);
    for (int i = 0; i < 9; i++) {
        if (row != NULL && (values[i] == NULL || PyDict_SetItem(row, *keys[i], values[i]) < 0)) {
            Py_CLEAR(row);
        }
    }
    if (row != NULL) {
        PyObject_GC_UnTrack(row); /* (inserting a list tracked it; a later one tracks it again) */
        item->row = row;
        item->name = task_name;      /* (the row holds them) */
        item->awaited_by = awaited_by;
        item->busy = busy_s;
    }
    for (int i = 0; i < 9; i++) {
        Py_XDECREF(values[i]);
    }
    Py_XDECREF(awaited_by);
    if (row == NULL) {
        PyErr_Clear(); /* (the reader's own row: it raises what it raises) */
    }
done:
    Py_DECREF(proxy_obj);
    return row != NULL;
}

/* The row of a task made by the reader, and what the table keeps of it. */
static int
reader_row(TableItem *item, PyObject *slow, int running)
{
    PyObject *row = PyObject_CallFunctionObjArgs(slow, item->task, running ? Py_True : Py_False,
                                                 NULL);
    if (row == NULL) {
        return -1;
    }
    item->row = row;
    PyObject *busy;
    if (!PyDict_Check(row) || (item->name = PyDict_GetItemWithError(row, k_task)) == NULL ||
        (item->awaited_by = PyDict_GetItemWithError(row, k_awaited_by)) == NULL ||
        !PyList_Check(item->awaited_by) || (busy = PyDict_GetItemWithError(row, k_busy_s)) == NULL ||
        ((item->busy = PyFloat_AsDouble(busy)) == -1.0 && PyErr_Occurred())) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "live_table: the reader's row lacks a field");
        }
        return -1;
    }
    return 0;
}

/* Tasks by address, for the awaited_by pass: an open-addressed table of indices (+1). */
static inline size_t
task_slot(const Py_ssize_t *index, const TableItem *items, size_t mask, PyObject *task)
{
    size_t i = (((uintptr_t)task) >> 4) * 11400714819323198485ULL >> 7;
    for (i &= mask; index[i] != 0 && items[index[i] - 1].task != task; i = (i + 1) & mask) {
    }
    return i;
}

static int
await_edge(const Py_ssize_t *index, TableItem *items, size_t mask, PyObject *target,
           PyObject *name)
{
    Py_ssize_t at = index[task_slot(index, items, mask, target)];
    return at != 0 ? PyList_Append(items[at - 1].awaited_by, name) : 0;
}

/* Who awaits whom: a task's future waiter is the task (or the gathering future) it waits on. */
static int
awaited_by_pass(TableItem *items, Py_ssize_t n, PyObject *gathering)
{
    size_t size = 16;
    while (size < (size_t)n * 2) {
        size *= 2;
    }
    Py_ssize_t *index = PyMem_Calloc(size, sizeof(Py_ssize_t));
    if (index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = size - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        index[task_slot(index, items, mask, items[i].task)] = i + 1;
    }
    int failed = 0;
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        PyObject *waiter;
        if (PyObject_GetOptionalAttr(items[i].task, s__fut_waiter, &waiter) < 0) {
            failed = 1;
            break;
        }
        if (waiter == NULL || waiter == Py_None) {
            Py_XDECREF(waiter);
            continue;
        }
        int gathers = gathering != Py_None ? Py_TYPE(waiter) == (PyTypeObject *)gathering
                                           : PyObject_HasAttrWithError(waiter, s__children);
        if (gathers < 0) {
            failed = 1;
        }
        else if (!gathers) {
            failed = await_edge(index, items, mask, waiter, items[i].name) < 0;
        }
        else {
            PyObject *children = PyObject_GetAttr(waiter, s__children);
            PyObject *seq = children ? PySequence_Fast(children, "_children") : NULL;
            for (Py_ssize_t j = 0; seq != NULL && j < PySequence_Fast_GET_SIZE(seq); j++) {
                PyObject *target = PySequence_Fast_GET_ITEM(seq, j);
                if (await_edge(index, items, mask, target, items[i].name) < 0) {
                    failed = 1;
                    break;
                }
            }
            failed |= seq == NULL;
            Py_XDECREF(seq);
            Py_XDECREF(children);
        }
        Py_DECREF(waiter);
    }
    PyMem_Free(index);
    return failed ? -1 : 0;
}

/* The busiest first, then by address (the order of the Python path's two stable sorts). */
static int
busiest_first(const void *a, const void *b)
{
    const TableItem *x = a, *y = b;
    if (x->busy != y->busy) {
        return x->busy > y->busy ? -1 : 1;
    }
    return (uintptr_t)x->task < (uintptr_t)y->task ? -1 : (uintptr_t)x->task > (uintptr_t)y->task;
}

static PyObject *
live_table(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyList_Check(args[0]) ||
        (args[5] != Py_None && !PyType_Check(args[5]))) {
        PyErr_SetString(PyExc_TypeError,
                        "live_table(tasks: list, current, owner, now, reader, gathering: type)");
        return NULL;
    }
    PyObject *owner = args[2], *reader = args[4], *gathering = args[5];
    double now = PyFloat_AsDouble(args[3]);
    if (now == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *keys[12] = {k_task,   k_id,          k_coroutine,  k_state,
                          k_age_s,  k_created_at,  k_awaiting,   k_await_chain,
                          k_awaited_by, k_steps,   k_busy_s,     k_waiting_s};
    if (row_template(keys) < 0) {
        return NULL;
    }
    /* (A copy of the list: the reader's Python code cannot change what is walked here.) */
    PyObject *tasks = PyList_GetSlice(args[0], 0, PY_SSIZE_T_MAX);
    PyObject *frameless = tasks ? PyObject_GetAttr(reader, s_frameless) : NULL;
    PyObject *chains = frameless ? PyObject_GetAttr(reader, s_chains) : NULL;
    PyObject *names = chains ? PyObject_GetAttr(reader, s_names) : NULL;
    PyObject *sites = names ? PyObject_GetAttr(reader, s_sites) : NULL;
    PyObject *slow = sites ? PyObject_GetAttr(reader, s_task_method) : NULL;
    PyObject *result = NULL;
    Py_ssize_t n = tasks != NULL ? PyList_GET_SIZE(tasks) : 0, made = 0;
    TableItem *items = PyMem_Calloc((size_t)(n ? n : 1), sizeof(TableItem));
    RowKinds kinds = {NULL, 0, 0};
    if (tasks == NULL || frameless == NULL || chains == NULL || names == NULL || sites == NULL ||
        slow == NULL || items == NULL || !PyAnySet_Check(frameless) || !PyDict_Check(chains) ||
        !PyDict_Check(names) || !PyDict_Check(sites)) {
        if (items == NULL && !PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        else if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "live_table: not a _live._Reader");
        }
        goto done;
    }
    for (; made < n; made++) {
        TableItem *item = &items[made];
        item->task = PyList_GET_ITEM(tasks, made);
        int running = item->task == args[1];
        if (running || owner == Py_None ||
            !live_row(item, owner, now, frameless, chains, names, sites, &kinds)) {
            if (reader_row(item, slow, running) < 0) {
                made++; /* (its row, if any, is let go of below) */
                goto done;
            }
        }
    }
    if (awaited_by_pass(items, n, gathering) < 0) {
        goto done;
    }
    qsort(items, (size_t)n, sizeof(TableItem), busiest_first);
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result != NULL && i < n; i++) {
        PyList_SET_ITEM(result, i, Py_NewRef(items[i].row));
    }
done:
    for (Py_ssize_t i = 0; items != NULL && i < made; i++) {
        Py_XDECREF(items[i].row);
    }
    PyMem_Free(items);
    kinds_clear(&kinds);
    Py_XDECREF(tasks);
    Py_XDECREF(frameless);
    Py_XDECREF(chains);
    Py_XDECREF(names);
    Py_XDECREF(sites);
    Py_XDECREF(slow);
    return result;
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Task, CancelledError, machinery_cache, Handle._run code, duration_bounds, "
     "latency_bounds)"},
    {"set_driver", set_driver, METH_O, "The code of loopwatch's run wrapper (a driver frame)."},
    {"thread_frame", thread_frame, METH_O, "The innermost frame of the thread with this ident."},
    {"thread_context", thread_context, METH_O,
     "The contextvars.Context the thread with this ident runs in now, or None."},
    {"set_task_type", set_task_type, METH_O, "The task class the factory makes tasks of."},
    {"forget_factories", forget_factories, METH_NOARGS,
     "forget_factories(): a loop was attached or detached: aiohttp's hook finds the running "
     "loop's Factory again."},
    {"forget_kinds", forget_kinds, METH_NOARGS,
     "Empty the cache in front of the machinery dictionary (when it is emptied)."},
    {"task_type", task_type, METH_O,
     "task_type(asyncio.Task): its subclass whose get_coro() sees through loopwatch's proxy."},
    {"use_tsc", use_tsc, METH_O,
     "use_tsc(flag): time task steps with the time-stamp counter (if invariant) or the clock."},
    {"step_clock", step_clock, METH_NOARGS,
     "The clock task steps are timed with: ('tsc' or 'monotonic', seconds per unit)."},
    {"wake_due", wake_due, METH_O,
     "wake_due(t): one of loopwatch's threads wakes at monotonic time t (the earliest counts)."},
    {"woken", woken, METH_NOARGS, "That thread woke and holds the GIL."},
    {"want", want, METH_NOARGS, "A thread of loopwatch's was just woken: hand it the GIL soon."},
    {"reset_handoff", reset_handoff, METH_NOARGS,
     "After a fork, in the child: no thread of loopwatch's waits for the GIL."},
#ifdef __linux__
    {"wait_readable", wait_readable, METH_VARARGS,
     "wait_readable(fds, timeout): poll for reading, then ask a busy loop for the GIL."},
#endif
    {"thread_starting", thread_starting, METH_NOARGS,
     "A thread of loopwatch's is being started: it waits for the GIL until thread_started()."},
    {"thread_started", thread_started, METH_NOARGS, "That thread holds the GIL."},
    {"forget_wakeups", forget_wakeups, METH_NOARGS,
     "loopwatch turned off: wake-ups rung or announced by ended threads are forgotten."},
    {"handoff_if_due", handoff_if_due, METH_NOARGS,
     "From a loop's thread: if a thread of loopwatch's is due, let it take the GIL now."},
    {"set_request_end", set_request_end, METH_O,
     "set_request_end(fn): fn(route, busy) when a task labelled with a route (_route) ends and "
     "the route has no row in the rows set by set_route_rows."},
    {"set_route_rows", set_route_rows, METH_O,
     "set_route_rows(rows): {route: Row}, where a labelled task's busy time goes when it ends."},
    {"set_request_routes", (PyCFunction)(void (*)(void))set_request_routes, METH_FASTCALL,
     "set_request_routes(canonical, failed): aiohttp requests' routes read from their match "
     "(None, None: off)."},
    {"request_route", request_route_py, METH_O,
     "request_route(request): the route label of an aiohttp request, or None before routing."},
    {"observe_request", (PyCFunction)(void (*)(void))observe_request, METH_FASTCALL,
     "observe_request(rows, route, busy): a request's busy time into rows[route] (a Row); "
     "False if there is none."},
    {"live_table", (PyCFunction)(void (*)(void))live_table, METH_FASTCALL,
     "live_table(tasks, current, owner, now, reader, gathering): the live view's rows of these "
     "tasks, awaited_by filled in, the busiest first."},
    {"await_key", (PyCFunction)(void (*)(void))await_key, METH_FASTCALL,
     "await_key(coro, frameless): the key of a chain of suspended coroutines (bytes), or None."},
    {"resume_later", resume_later, METH_O,
     "Call fn once from the program's thread soon (a pending call, or a loop's next pulse)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "loopwatch._accel",
    .m_doc = "loopwatch's per-task and per-step hot paths, compiled (optional).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                                 \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return NULL;

PyMODINIT_FUNC
PyInit__accel(void)
{
    INTERN(s_proxy_ended, "proxy_ended");
    INTERN(s_cancel_arrived, "cancel_arrived");
    INTERN(s_cancel_ended, "cancel_ended");
    INTERN(s_half, "half");
    INTERN(s_threshold, "threshold");
    INTERN(s_on_slow, "on_slow");
    INTERN(s_throw, "throw");
    INTERN(s_close, "close");
    INTERN(s_name, "__name__");
    INTERN(s_qualname, "__qualname__");
    INTERN(s_cr_frame, "cr_frame");
    INTERN(s_cr_code, "cr_code");
    INTERN(s_cr_await, "cr_await");
    INTERN(s_cr_running, "cr_running");
    INTERN(s_cr_suspended, "cr_suspended");
    INTERN(s_cr_origin, "cr_origin");
    INTERN(s_row, "row");
    INTERN(s_loop, "loop");
    INTERN(s__compiled, "_compiled");
    INTERN(s_adopt, "adopt");
    INTERN(s_clear, "clear");
    INTERN(s_fd, "fd");
    INTERN(s_gi_frame, "gi_frame");
    INTERN(s_gi_yieldfrom, "gi_yieldfrom");
    INTERN(s__coro, "_coro");
    g_cr_frame = find_getter(&PyCoro_Type, "cr_frame");
    g_cr_await = find_getter(&PyCoro_Type, "cr_await");
    g_gi_frame = find_getter(&PyGen_Type, "gi_frame");
    g_gi_yieldfrom = find_getter(&PyGen_Type, "gi_yieldfrom");
    INTERN(s_get_name, "get_name");
    INTERN(s_cancelling, "cancelling");
    INTERN(s_task_method, "task");
    INTERN(s_frameless, "frameless");
    INTERN(s_chains, "chains");
    INTERN(s_names, "names");
    INTERN(s_sites, "sites");
    INTERN(s__fut_waiter, "_fut_waiter");
    INTERN(s__children, "_children");
    INTERN(h_coro, "_coro");
    INTERN(h__route, "_route");
    INTERN(h_type, "type");
    INTERN(h_http, "http");
    INTERN(h_method, "method");
    INTERN(h_root_path, "root_path");
    INTERN(h_app_root_path, "app_root_path");
    INTERN(h_path, "path");
    INTERN(h__match_info, "_match_info");
    INTERN(h__method, "_method");
    INTERN(h_route, "route");
    INTERN(h_empty, "");
    INTERN(h_unmatched, "<unmatched>");
    INTERN(k_task, "task");
    INTERN(k_id, "id");
    INTERN(k_coroutine, "coroutine");
    INTERN(k_state, "state");
    INTERN(k_age_s, "age_s");
    INTERN(k_created_at, "created_at");
    INTERN(k_awaiting, "awaiting");
    INTERN(k_await_chain, "await_chain");
    INTERN(k_awaited_by, "awaited_by");
    INTERN(k_steps, "steps");
    INTERN(k_busy_s, "busy_s");
    INTERN(k_waiting_s, "waiting_s");
    INTERN(v_pending, "pending");
    INTERN(v_cancelling, "cancelling");
#ifdef HAVE_TSC
    tsc_setup();
#endif
    g_loop_kwnames = PyTuple_Pack(1, s_loop);
    if (g_loop_kwnames == NULL) {
        return NULL;
    }
    if (PyType_Ready(&Counts_Type) < 0 || PyType_Ready(&Row_Type) < 0 || PyType_Ready(&Watch_Type) < 0 ||
        PyType_Ready(&Timed_Type) < 0 || PyType_Ready(&Factory_Type) < 0 ||
        PyType_Ready(&Pulse_Type) < 0 || PyType_Ready(&Hook_Type) < 0 ||
        PyType_Ready(&Thread_Type) < 0 || PyType_Ready(&FrameworkHook_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&accel_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "TaskCounts", (PyObject *)&Counts_Type) < 0 ||
        PyModule_AddObjectRef(m, "Row", (PyObject *)&Row_Type) < 0 ||
        PyModule_AddObjectRef(m, "StepWatch", (PyObject *)&Watch_Type) < 0 ||
        PyModule_AddObjectRef(m, "Timed", (PyObject *)&Timed_Type) < 0 ||
        PyModule_AddObjectRef(m, "Factory", (PyObject *)&Factory_Type) < 0 ||
        PyModule_AddObjectRef(m, "Pulse", (PyObject *)&Pulse_Type) < 0 ||
        PyModule_AddObjectRef(m, "MethodHook", (PyObject *)&Hook_Type) < 0 ||
        PyModule_AddObjectRef(m, "Thread", (PyObject *)&Thread_Type) < 0 ||
        PyModule_AddObjectRef(m, "FrameworkHook", (PyObject *)&FrameworkHook_Type) < 0 ||
        PyModule_AddIntConstant(m, "API", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
