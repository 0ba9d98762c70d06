/* _lwaccel: a compiled step-timing proxy for loopwatch (prototype, not shipped).
 *
 * Timed(coro, cfg=None, owner=None, label=None) stands between a task and its coroutine, like
 * loopwatch._timing.Timed, and adds up the time each step holds the loop.
 *
 * The C asyncio.Task drives its coroutine with PyIter_Send(), which calls the type's am_send
 * slot when there is one (Objects/abstract.c): this type has one, so a step is a C call, and the
 * coroutine's return reaches the task as PYGEN_RETURN plus the value, with no StopIteration
 * object made. Cancellation goes through the Python-level method `throw` (the task calls it by
 * name), as for any coroutine.
 *
 * Fields, as the pure-Python proxy has them: busy, steps, max_step, slow_steps, _watch (a step
 * longer than this is a new maximum or a long one), _cfg (a StepWatch: half, threshold,
 * on_slow), _owner (its proxy_ended(proxy, exc) is called once when the coroutine ends: exc is
 * None for a return, else the exception), _label, born, _code, _lasti, _stack, _leaked.
 *
 * Clock: clock_gettime(CLOCK_MONOTONIC), the clock behind time.perf_counter() and
 * time.monotonic() on Linux; `born` is set from it at construction.
 *
 * Errors raised by on_slow or proxy_ended are reported with PyErr_WriteUnraisable and never
 * reach the program (the pure-Python proxy lets them through into the task).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    PyObject *coro;
    PyObject *cfg;
    PyObject *owner;
    PyObject *label;
    PyObject *code;
    PyObject *lasti;
    PyObject *stack;
    PyObject *leaked;
    double born;
    double busy;
    double max_step;
    double watch;
    Py_ssize_t steps;
    Py_ssize_t slow_steps;
    char ended;
} TimedObject;

static PyTypeObject Timed_Type;

static PyObject *s_proxy_ended, *s_half, *s_threshold, *s_on_slow, *s_throw, *s_send,
    *s_close, *s_name, *s_qualname, *s_cr_frame, *s_cr_code, *s_cr_await, *s_cr_running,
    *s_cr_suspended, *s_cr_origin;

/* How often each entry point ran (to check which one the C Task uses). */
static unsigned long long n_am_send, n_iternext, n_send, n_throw;

static inline double
now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
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

/* -- hooks (called with no exception set) ---------------------------------------------- */

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
    double half = attr_double(self->cfg, s_half, Py_HUGE_VAL);
    self->watch = self->max_step < half ? self->max_step : half;
    if (took >= half) {
        double threshold = attr_double(self->cfg, s_threshold, Py_HUGE_VAL);
        if (took >= threshold) {
            self->slow_steps++;
        }
        PyObject *on_slow = PyObject_GetAttr(self->cfg, s_on_slow);
        if (on_slow == NULL) {
            PyErr_Clear();
            return;
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
}

static void
call_end(TimedObject *self, PyObject *exc)
{
    if (self->ended) {
        return;
    }
    self->ended = 1;
    PyObject *owner = self->owner;
    if (owner == NULL || owner == Py_None) {
        return;
    }
    Py_INCREF(owner);
    PyObject *args[3] = {owner, (PyObject *)self, exc ? exc : Py_None};
    PyObject *r = PyObject_VectorcallMethod(s_proxy_ended, args, 3, NULL);
    if (r == NULL) {
        PyErr_WriteUnraisable(owner);
    }
    Py_XDECREF(r);
    Py_DECREF(owner);
}

/* After a step: count it, and if the coroutine ended, tell the owner. `status` is
   PYGEN_NEXT, PYGEN_RETURN, or PYGEN_ERROR with the exception set (which stays set). */
static inline void
step_done(TimedObject *self, double start, PySendResult status)
{
    double took = now_s() - start;
    self->busy += took;
    self->steps++;
    if (status == PYGEN_NEXT) {
        if (took > self->watch) {
            long_step(self, took);
        }
        return;
    }
    PyObject *exc = NULL;
    if (status == PYGEN_ERROR) {
        exc = take_exception();
    }
    if (took > self->watch) {
        long_step(self, took);
    }
    /* A StopIteration out of throw() is a return. */
    if (exc != NULL && PyErr_GivenExceptionMatches(exc, PyExc_StopIteration)) {
        call_end(self, NULL);
    }
    else {
        call_end(self, exc);
    }
    if (exc != NULL) {
        put_exception(exc);
    }
}

/* -- driving ----------------------------------------------------------------------------- */

static PySendResult
Timed_am_send(PyObject *op, PyObject *arg, PyObject **presult)
{
    TimedObject *self = (TimedObject *)op;
    n_am_send++;
    double start = now_s();
    PySendResult status = PyIter_Send(self->coro, arg, presult);
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

static PyObject *
Timed_iternext(PyObject *op)
{
    PyObject *result;
    n_iternext++;
    n_am_send--;
    PySendResult status = Timed_am_send(op, Py_None, &result);
    if (status == PYGEN_RETURN) {
        return stop_with(result);
    }
    return result;
}

static PyObject *
Timed_send(PyObject *op, PyObject *value)
{
    PyObject *result;
    n_send++;
    n_am_send--;
    PySendResult status = Timed_am_send(op, value, &result);
    if (status == PYGEN_RETURN) {
        return stop_with(result);
    }
    return result;
}

static PyObject *
Timed_throw(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    TimedObject *self = (TimedObject *)op;
    PyObject *stack[4];
    n_throw++;
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    stack[0] = self->coro;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        stack[i + 1] = args[i];
    }
    double start = now_s();
    PyObject *result = PyObject_VectorcallMethod(s_throw, stack, (size_t)nargs + 1, NULL);
    step_done(self, start, result != NULL ? PYGEN_NEXT : PYGEN_ERROR);
    return result;
}

static PyObject *
Timed_close(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    TimedObject *self = (TimedObject *)op;
    return PyObject_CallMethodNoArgs(self->coro, s_close);
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
    if (t < 0) {
        return NULL;
    }
    return PyBool_FromLong(t);
}

#define FORWARD(fn, name, dflt)                                  \
    static PyObject *fn(PyObject *op, void *Py_UNUSED(closure))  \
    {                                                            \
        return forward((TimedObject *)op, name, dflt);           \
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
Timed_repr(PyObject *op)
{
    return PyObject_Repr(((TimedObject *)op)->coro);
}

/* -- life cycle -------------------------------------------------------------------------- */

static int
init_fields(TimedObject *self, PyObject *coro, PyObject *cfg, PyObject *owner, PyObject *label)
{
    self->coro = Py_NewRef(coro);
    self->cfg = Py_NewRef(cfg ? cfg : Py_None);
    self->owner = Py_NewRef(owner ? owner : Py_None);
    self->label = Py_NewRef(label ? label : Py_None);
    self->code = Py_NewRef(Py_None);
    self->lasti = Py_NewRef(Py_None);
    self->stack = Py_NewRef(Py_None);
    self->leaked = Py_NewRef(Py_False);
    self->born = now_s();
    self->busy = self->max_step = self->watch = 0.0;
    self->steps = self->slow_steps = 0;
    self->ended = 0;
    return 0;
}

/* Timed(coro, cfg=None, owner=None, label=None), positional only: the type's vectorcall,
   so making a proxy costs no argument tuple. */
static PyObject *
Timed_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if ((kwnames != NULL && PyTuple_GET_SIZE(kwnames)) || nargs < 1 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "Timed(coro, cfg=None, owner=None, label=None)");
        return NULL;
    }
    TimedObject *self = PyObject_GC_New(TimedObject, (PyTypeObject *)type);
    if (self == NULL) {
        return NULL;
    }
    init_fields(self, args[0], nargs > 1 ? args[1] : NULL, nargs > 2 ? args[2] : NULL,
                nargs > 3 ? args[3] : NULL);
    PyObject_GC_Track(self);
    return (PyObject *)self;
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
    Py_VISIT(self->coro);
    Py_VISIT(self->cfg);
    Py_VISIT(self->owner);
    Py_VISIT(self->label);
    Py_VISIT(self->code);
    Py_VISIT(self->lasti);
    Py_VISIT(self->stack);
    Py_VISIT(self->leaked);
    return 0;
}

static int
Timed_clear(PyObject *op)
{
    TimedObject *self = (TimedObject *)op;
    /* coro stays until dealloc: repr() and the forwarded attributes read it. */
    Py_CLEAR(self->cfg);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->label);
    Py_CLEAR(self->code);
    Py_CLEAR(self->lasti);
    Py_CLEAR(self->stack);
    Py_CLEAR(self->leaked);
    return 0;
}

static void
Timed_dealloc(PyObject *op)
{
    TimedObject *self = (TimedObject *)op;
    PyObject_GC_UnTrack(op);
    Timed_clear(op);
    Py_CLEAR(self->coro);
    PyObject_GC_Del(op);
}

/* -- the type ---------------------------------------------------------------------------- */

static PyMethodDef Timed_methods[] = {
    {"send", (PyCFunction)Timed_send, METH_O, NULL},
    {"throw", (PyCFunction)(void (*)(void))Timed_throw, METH_FASTCALL, NULL},
    {"close", Timed_close, METH_NOARGS, NULL},
    {"__await__", Timed_self_meth, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Timed_getset[] = {
    {"__name__", get_name, NULL, NULL, NULL},
    {"__qualname__", get_qualname, NULL, NULL, NULL},
    {"__wrapped__", get_wrapped, NULL, NULL, NULL},
    {"cr_frame", get_cr_frame, NULL, NULL, NULL},
    {"cr_code", get_cr_code, NULL, NULL, NULL},
    {"cr_await", get_cr_await, NULL, NULL, NULL},
    {"cr_running", get_cr_running, NULL, NULL, NULL},
    {"cr_suspended", get_cr_suspended, NULL, NULL, NULL},
    {"cr_origin", get_cr_origin, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Timed_members[] = {
    {"_coro", T_OBJECT, offsetof(TimedObject, coro), READONLY, NULL},
    {"_cfg", T_OBJECT, offsetof(TimedObject, cfg), 0, NULL},
    {"_owner", T_OBJECT, offsetof(TimedObject, owner), 0, NULL},
    {"_label", T_OBJECT, offsetof(TimedObject, label), 0, NULL},
    {"_code", T_OBJECT, offsetof(TimedObject, code), 0, NULL},
    {"_lasti", T_OBJECT, offsetof(TimedObject, lasti), 0, NULL},
    {"_stack", T_OBJECT, offsetof(TimedObject, stack), 0, NULL},
    {"_leaked", T_OBJECT, offsetof(TimedObject, leaked), 0, NULL},
    {"born", T_DOUBLE, offsetof(TimedObject, born), 0, NULL},
    {"busy", T_DOUBLE, offsetof(TimedObject, busy), 0, NULL},
    {"max_step", T_DOUBLE, offsetof(TimedObject, max_step), 0, NULL},
    {"_watch", T_DOUBLE, offsetof(TimedObject, watch), 0, NULL},
    {"steps", T_PYSSIZET, offsetof(TimedObject, steps), 0, NULL},
    {"slow_steps", T_PYSSIZET, offsetof(TimedObject, slow_steps), 0, NULL},
    {"_ended", T_BOOL, offsetof(TimedObject, ended), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyAsyncMethods Timed_as_async = {
    .am_await = Timed_self,
    .am_send = Timed_am_send,
};

static PyTypeObject Timed_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_lwaccel.Timed",
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
};

static PyObject *
counts(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{sKsKsKsK}", "am_send", n_am_send, "__next__", n_iternext, "send",
                         n_send, "throw", n_throw);
}

static PyMethodDef module_methods[] = {
    {"counts", counts, METH_NOARGS,
     "How often each entry point ran: am_send (C callers), __next__, send, throw."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lwaccel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_lwaccel",
    .m_doc = "loopwatch's compiled step-timing proxy (prototype).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                              \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return NULL;

PyMODINIT_FUNC
PyInit__lwaccel(void)
{
    INTERN(s_proxy_ended, "proxy_ended");
    INTERN(s_half, "half");
    INTERN(s_threshold, "threshold");
    INTERN(s_on_slow, "on_slow");
    INTERN(s_throw, "throw");
    INTERN(s_send, "send");
    INTERN(s_close, "close");
    INTERN(s_name, "__name__");
    INTERN(s_qualname, "__qualname__");
    INTERN(s_cr_frame, "cr_frame");
    INTERN(s_cr_code, "cr_code");
    INTERN(s_cr_await, "cr_await");
    INTERN(s_cr_running, "cr_running");
    INTERN(s_cr_suspended, "cr_suspended");
    INTERN(s_cr_origin, "cr_origin");
    if (PyType_Ready(&Timed_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&lwaccel_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Timed", (PyObject *)&Timed_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
