// nnfast._C's Python module: the front end's common call in one C++ call.
//
// nnfast.dense() and nnfast.mlp() (nnfast/functional.py) hand a call here once they know it is a
// plain eager call (no explicit backend, autocast, transforms, modes or torch.compile). This
// checks the tensors (exact torch.Tensor / nn.Parameter, floating dtype, shapes that chain, one
// dtype, one device), builds the dispatcher's key exactly as nnfast/_backends/chooser.py's
// key_of() and mlp_key() do, looks it up in chooser._decisions, and, for a confirmed decision,
// runs PyTorch's own path (F.linear + the activation, layer by layer: the same ATen ops, so the
// same numbers and the same autograd graph) or the extension's dense inference kernel. It returns
//   a Tensor: the result;
//   a str:    the confirmed path, for Python to run (fused training, oneDNN, Triton, fused MLP);
//   None:     anything else (invalid or unusual arguments, no confirmed decision): Python's
//             general path, with its checks and clear errors, decides.
// A small layer's whole call is a few microseconds of ATen; the Python checks it replaces were as
// much again (nnfast would be slower than the two PyTorch calls it stands for).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace {

// Interned attribute names and path names, made once at import.
PyObject *s_act, *s_code, *s_name, *s_param, *s_confirmed, *s_choice, *s_mlp, *s_saves_pre;
PyObject *s_unfused, *s_extension;

// A new reference to o (Py_NewRef, which Pythons before 3.10 lack).
PyObject* new_ref(PyObject* o) {
  Py_INCREF(o);
  return o;
}

// A new reference to obj.attr (nullptr with an exception set on failure).
PyObject* attr(PyObject* obj, PyObject* name) { return PyObject_GetAttr(obj, name); }

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// chooser.m_bucket: 1 << max(0, (m - 1).bit_length()), M rounded up to a power of two (M = 0: 2)
int64_t m_bucket(int64_t m) {
  uint64_t v = m >= 1 ? static_cast<uint64_t>(m - 1) : 1;  // Python: (-1).bit_length() == 1
  int64_t b = 1;
  while (v != 0) {
    b <<= 1;
    v >>= 1;
  }
  return b;
}

// The ActivationSpec's row code, name (borrowed from the row, kept alive by spec) and parameter.
struct Spec {
  int64_t code = -1;
  PyObject* name = nullptr;       // new reference
  PyObject* param_obj = nullptr;  // new reference
  double param = 0.0;
  bool ok = false;
  explicit Spec(PyObject* spec) {
    PyObject* row = attr(spec, s_act);
    if (!row) return;
    PyObject* code_obj = attr(row, s_code);
    name = attr(row, s_name);
    param_obj = attr(spec, s_param);
    Py_DECREF(row);
    if (code_obj && name && param_obj) {
      code = PyLong_AsLongLong(code_obj);
      param = PyFloat_AsDouble(param_obj);
      ok = !PyErr_Occurred();
    }
    Py_XDECREF(code_obj);
  }
  ~Spec() {
    Py_XDECREF(name);
    Py_XDECREF(param_obj);
  }
  // new references for a key tuple
  PyObject* name_ref() const { return new_ref(name); }
  PyObject* param_ref() const { return new_ref(param_obj); }
  // ActivationSpec.saves_pre (a property: read only when training); -1 on error
  int saves_pre(PyObject* spec) const {
    PyObject* v = attr(spec, s_saves_pre);
    if (v == nullptr) return -1;
    int yes = PyObject_IsTrue(v);
    Py_DECREF(v);
    return yes;
  }
  // The gated rows (swiglu, geglu, reglu): csrc/activations.h's gated_base, by code.
  bool gated() const { return code >= 9 && code <= 11; }
};

// The activation with PyTorch semantics: nnfast/activations.py's ``fn`` of each row, as the same
// ATen calls (tests/test_dispatch.py checks this against the table, bitwise, with gradients).
// An undefined tensor for a code this does not know (Python runs the call).
at::Tensor activation(int64_t code, double param, const at::Tensor& x) {
  switch (code) {
    case 0: return x;
    case 1: return at::relu(x);
    case 2: return at::leaky_relu(x, param);
    case 3: return at::gelu(x);
    case 4: return at::gelu(x, "tanh");
    case 5: return at::silu(x);
    case 6: return at::sigmoid(x);
    case 7: return at::tanh(x);
    case 8: return at::square(at::relu(x));
    case 12: return at::mul(x, at::sigmoid(at::mul(x, 1.702)));
    case 9: case 10: case 11: {
      auto halves = x.chunk(2, -1);
      return at::mul(activation(code == 9 ? 5 : code == 10 ? 3 : 1, param, halves[0]), halves[1]);
    }
    default: return at::Tensor();
  }
}

// A tensor argument the fast path takes: exactly torch.Tensor or nn.Parameter (a subclass may
// override anything), with a floating dtype.
const at::Tensor* plain(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return float_dtype(t.scalar_type()) ? &t : nullptr;
}

// Whether (weight, bias) is a valid layer for an input of ``width`` features like x.
bool valid_layer(const at::Tensor& x, int64_t width, const at::Tensor& w, const at::Tensor* b,
                 bool gated) {
  if (w.dim() != 2 || w.scalar_type() != x.scalar_type() || w.size(1) != width) return false;
  if (gated && w.size(0) % 2 != 0) return false;
  if (w.device() != x.device()) return false;
  if (b != nullptr) {
    if (b->dim() != 1 || b->size(0) != w.size(0) || b->scalar_type() != x.scalar_type() ||
        b->device() != x.device())
      return false;
  }
  return true;
}

// The confirmed choice for key in decisions (a new reference to its str), else nullptr: no
// decision (no error set) or an error. Steals key (nullptr: an error building it).
PyObject* confirmed_choice(PyObject* decisions, PyObject* key) {
  if (key == nullptr) return nullptr;
  PyObject* decision = PyDict_GetItemWithError(decisions, key);  // borrowed
  Py_DECREF(key);
  if (decision == nullptr) return nullptr;
  PyObject* confirmed = attr(decision, s_confirmed);
  if (confirmed == nullptr) return nullptr;
  int yes = PyObject_IsTrue(confirmed);
  Py_DECREF(confirmed);
  return yes == 1 ? attr(decision, s_choice) : nullptr;
}

// What a fast-path function returns when confirmed_choice gave nothing: None, or the error.
PyObject* none_or_error() {
  if (PyErr_Occurred()) return nullptr;
  Py_RETURN_NONE;
}

// Steals every reference in items; nullptr if any is nullptr.
PyObject* tuple_of(std::initializer_list<PyObject*> items) {
  bool ok = true;
  for (PyObject* o : items) ok = ok && o != nullptr;
  PyObject* t = ok ? PyTuple_New(static_cast<Py_ssize_t>(items.size())) : nullptr;
  Py_ssize_t i = 0;
  for (PyObject* o : items) {
    if (t != nullptr) {
      PyTuple_SET_ITEM(t, i++, o);
    } else {
      Py_XDECREF(o);
    }
  }
  return t;
}

PyObject* dtype_obj(at::ScalarType t) {
  PyObject* d = reinterpret_cast<PyObject*>(torch::getTHPDtype(t));
  Py_INCREF(d);
  return d;
}

// x's shape with its last dimension replaced by n
std::vector<int64_t> leading_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

PyObject* bool_obj(bool v) { return PyBool_FromLong(v); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> dense_fwd_op(const at::Tensor& x, const at::Tensor& w,
                                                const c10::optional<at::Tensor>& b, int64_t code,
                                                double param, bool save_pre) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nnfast_ext::dense_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           int64_t, double, bool)>();
  return op.call(x, w, b, code, param, save_pre);
}

// The extension's dense layer with its autograd node in C++ (nnfast/_ops.py's EagerDense without
// Python on the way: a small layer's forward and backward cost ~25 us less). Like EagerDense it
// returns the pre-activation too (an internal output through which a double backward reaches
// it), keeps x, weight and the output or pre-activation, and leaves create_graph backward and a
// gradient arriving at the pre-activation to nnfast._ops.layer_grads (PyTorch ops on the
// activation table, differentiable again).
struct ExtensionDense : public torch::autograd::Function<ExtensionDense> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const c10::optional<at::Tensor>& b, int64_t code, double param,
                               bool saves_pre, std::string name) {
    auto [out, pre] = dense_fwd_op(x, w, b, code, param, saves_pre);
    at::Tensor kept = code == 0 ? out.new_empty({0}) : saves_pre ? pre : out;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, w, kept});
    ctx->saved_data["code"] = code;
    ctx->saved_data["param"] = param;
    ctx->saved_data["name"] = std::move(name);
    ctx->saved_data["has_bias"] = b.has_value();
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = grads[0], &grad_pre = grads[1];
    const bool needs[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                           ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    variable_list result(7);
    if (grad_pre.defined() || at::GradMode::is_enabled()) {
      python_grads(ctx, grad_out, grad_pre, saved, needs, result);
    } else if (grad_out.defined()) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("nnfast_ext::dense_bwd", "")
                           .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t, double, bool, bool, bool)>();
      auto [gx, gw, gb] = op.call(grad_out, saved[0], saved[1], saved[2],
                                  ctx->saved_data["code"].toInt(),
                                  ctx->saved_data["param"].toDouble(), needs[0], needs[1], needs[2]);
      if (needs[0]) result[0] = gx;
      if (needs[1]) result[1] = gw;
      if (needs[2]) result[2] = gb;
    }
    return result;
  }

  // nnfast._ops.layer_grads(grad_out, grad_pre, x, weight, kept, spec, needs, backward_fn)
  static void python_grads(AutogradContext* ctx, const at::Tensor& grad_out,
                           const at::Tensor& grad_pre, const variable_list& saved,
                           const bool* needs, variable_list& result) {
    pybind11::gil_scoped_acquire gil;
    auto ops = pybind11::module_::import("nnfast._ops");
    auto spec = ops.attr("_spec")(ctx->saved_data["name"].toStringRef(),
                                  ctx->saved_data["param"].toDouble());
    auto backward_fn = pybind11::module_::import("nnfast._backends.extension").attr("backward");
    auto none_or = [](const at::Tensor& t) {
      return t.defined() ? pybind11::cast(t) : pybind11::none();
    };
    auto grads = ops.attr("layer_grads")(none_or(grad_out), none_or(grad_pre), saved[0], saved[1],
                                         saved[2], spec,
                                         pybind11::make_tuple(needs[0], needs[1], needs[2]),
                                         backward_fn);
    for (int i = 0; i < 3; ++i) {
      pybind11::object g = grads[pybind11::int_(i)];
      if (needs[i] && !g.is_none()) result[i] = g.cast<at::Tensor>();
    }
  }
};

// extension_dense(x, weight, bias, spec) -> Tensor: ExtensionDense's output (x (M, K),
// arguments valid: nnfast.functional checks them first).
PyObject* py_extension_dense(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) ||
      (args[2] != Py_None && !THPVariable_Check(args[2]))) {
    PyErr_SetString(PyExc_TypeError, "nnfast._C.extension_dense(x, weight, bias, spec)");
    return nullptr;
  }
  Spec spec(args[3]);
  if (!spec.ok) return nullptr;
  const int saves_pre = spec.saves_pre(args[3]);
  if (saves_pre < 0) return nullptr;
  c10::optional<at::Tensor> bias;
  if (args[2] != Py_None) bias = THPVariable_Unpack(args[2]);
  std::string name = PyUnicode_AsUTF8(spec.name);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    const at::Tensor& x = THPVariable_Unpack(args[0]);
    TORCH_CHECK(x.dim() == 2, "nnfast._C.extension_dense: x must be 2-D (M, K), got ", x.sizes());
    out = ExtensionDense::apply(x, THPVariable_Unpack(args[1]), bias, spec.code, spec.param,
                                saves_pre == 1, std::move(name))[0];
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// dense(x, weight, bias, spec, decisions) -> Tensor | str | None; see the top of this file.
PyObject* fast_dense(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "nnfast._C.dense(x, weight, bias, spec, decisions)");
    return nullptr;
  }
  const at::Tensor* x = plain(args[0]);
  const at::Tensor* w = plain(args[1]);
  const at::Tensor* b = args[2] == Py_None ? nullptr : plain(args[2]);
  if (x == nullptr || w == nullptr || (args[2] != Py_None && b == nullptr) || x->dim() < 1)
    Py_RETURN_NONE;
  const int64_t k = x->size(-1);
  const int64_t m = k > 0 ? x->numel() / k : 0;
  Spec spec(args[3]);
  if (!spec.ok) return nullptr;
  if (k == 0 || !valid_layer(*x, k, *w, b, spec.gated())) Py_RETURN_NONE;
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (x->requires_grad() || w->requires_grad() || (b != nullptr && b->requires_grad()));
  // chooser.key_of
  PyObject* choice = confirmed_choice(
      args[4], tuple_of({THPDevice_New(x->device()), dtype_obj(x->scalar_type()),
                         spec.name_ref(), spec.param_ref(), bool_obj(needs_grad),
                         bool_obj(b != nullptr), PyLong_FromLongLong(m_bucket(m)),
                         PyLong_FromLongLong(w->size(0)), PyLong_FromLongLong(k)}));
  if (choice == nullptr) return none_or_error();
  const bool unfused = PyUnicode_Compare(choice, s_unfused) == 0;
  if (!unfused && PyUnicode_Compare(choice, s_extension) != 0) return choice;  // Python runs it
  Py_DECREF(choice);
  const int saves_pre = needs_grad && !unfused ? spec.saves_pre(args[3]) : 0;
  if (saves_pre < 0) return nullptr;
  std::string name = needs_grad && !unfused ? PyUnicode_AsUTF8(spec.name) : "";
  at::Tensor out;
  {  // as functional.dense: (M, K) rows, the result back in x's leading shape
    pybind11::gil_scoped_release no_gil;
    c10::optional<at::Tensor> bias = b != nullptr ? c10::optional<at::Tensor>(*b) : c10::nullopt;
    const bool flat = x->dim() == 2;
    const at::Tensor x2 = flat ? *x : x->reshape({-1, k});
    if (unfused) {  // chooser.unfused: act(F.linear(x, weight, bias))
      out = activation(spec.code, spec.param, at::linear(x2, *w, bias));
    } else if (needs_grad) {
      out = ExtensionDense::apply(x2, *w, bias, spec.code, spec.param, saves_pre == 1,
                                  std::move(name))[0];
    } else {  // the extension's kernel (functional._run's inference call)
      out = std::get<0>(dense_fwd_op(x2, *w, bias, spec.code, spec.param, false));
    }
    if (!flat && out.defined()) out = out.reshape(leading_shape(*x, out.size(1)));
  }
  if (!out.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// mlp(x, weights, biases, spec, decisions) -> Tensor | str | None; weights a list of tensors,
// biases a list of tensors or None, one per weight (nnfast.mlp without checkpoint).
PyObject* fast_mlp(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "nnfast._C.mlp(x, weights, biases, spec, decisions)");
    return nullptr;
  }
  const at::Tensor* x = plain(args[0]);
  if (x == nullptr || x->dim() < 1 || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2]))
    Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(args[1]);
  if (n == 0 || PyList_GET_SIZE(args[2]) != n) Py_RETURN_NONE;
  const int64_t k = x->size(-1);
  const int64_t m = k > 0 ? x->numel() / k : 0;
  Spec spec(args[3]);
  if (!spec.ok) return nullptr;
  std::vector<const at::Tensor*> ws(n), bs(n);
  bool needs_grad = x->requires_grad();
  int64_t width = k;
  for (const auto i : c10::irange(n)) {
    PyObject* wo = PyList_GET_ITEM(args[1], i);
    PyObject* bo = PyList_GET_ITEM(args[2], i);
    ws[i] = plain(wo);
    bs[i] = bo == Py_None ? nullptr : plain(bo);
    const bool gated = spec.gated() && i < n - 1;
    if (ws[i] == nullptr || (bo != Py_None && bs[i] == nullptr) ||
        !valid_layer(*x, width, *ws[i], bs[i], gated) || ws[i]->size(0) == 0 || width == 0)
      Py_RETURN_NONE;
    needs_grad = needs_grad || ws[i]->requires_grad() || (bs[i] && bs[i]->requires_grad());
    width = gated ? ws[i]->size(0) / 2 : ws[i]->size(0);
  }
  needs_grad = needs_grad && at::GradMode::is_enabled();
  // chooser.mlp_key, with chooser.mlp_mode
  const int64_t mode = !needs_grad ? 0 : (x->requires_grad() && x->is_leaf() ? 2 : 1);
  PyObject* widths = PyTuple_New(n);
  PyObject* has_bias = PyTuple_New(n);
  if (widths == nullptr || has_bias == nullptr) {
    Py_XDECREF(widths);
    Py_XDECREF(has_bias);
    return nullptr;
  }
  for (const auto i : c10::irange(n)) {
    PyTuple_SET_ITEM(widths, i, PyLong_FromLongLong(ws[i]->size(0)));
    PyTuple_SET_ITEM(has_bias, i, bool_obj(bs[i] != nullptr && bs[i]->numel() > 0));
  }
  PyObject* choice = confirmed_choice(
      args[4], tuple_of({new_ref(s_mlp), THPDevice_New(x->device()), dtype_obj(x->scalar_type()),
                         spec.name_ref(), spec.param_ref(), PyLong_FromLongLong(mode),
                         PyLong_FromLongLong(m_bucket(m)), PyLong_FromLongLong(k), widths,
                         has_bias}));
  if (choice == nullptr) return none_or_error();
  if (PyUnicode_Compare(choice, s_unfused) != 0) return choice;  // the fused MLP: Python runs it
  Py_DECREF(choice);
  at::Tensor h;
  {  // functional._mlp_unfused: F.linear, then the activation but after the last layer
    pybind11::gil_scoped_release no_gil;
    const bool flat = x->dim() == 2;
    h = flat ? *x : x->reshape({-1, k});
    for (const auto i : c10::irange(n)) {
      c10::optional<at::Tensor> bias;
      if (bs[i] != nullptr && bs[i]->numel() > 0) bias = *bs[i];
      h = at::linear(h, *ws[i], bias);
      if (i < n - 1) {
        h = activation(spec.code, spec.param, h);
        if (!h.defined()) break;
      }
    }
    if (!flat && h.defined()) h = h.reshape(leading_shape(*x, h.size(1)));
  }
  if (!h.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(h));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"dense", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_dense)),
     METH_FASTCALL, "nnfast.dense's common call (see csrc/fast.cpp)"},
    {"mlp", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_mlp)), METH_FASTCALL,
     "nnfast.mlp's common call (see csrc/fast.cpp)"},
    {"extension_dense",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_extension_dense)),
     METH_FASTCALL, "the extension's dense layer with its autograd node in C++"},
    {nullptr, nullptr, 0, nullptr}};

#define NNFAST_STR2(a) #a
#define NNFAST_STR(a) NNFAST_STR2(a)
#define NNFAST_CAT2(a, b) a##b
#define NNFAST_CAT(a, b) NNFAST_CAT2(a, b)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, NNFAST_STR(TORCH_EXTENSION_NAME), nullptr, -1,
                          methods};

}  // namespace

// The module's name is the build's: nnfast._C (setup.py) or nnfast_C (the first-use JIT build).
extern "C" PyObject* NNFAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  struct Name {
    PyObject** slot;
    const char* text;
  };
  for (Name n : {Name{&s_act, "act"}, Name{&s_code, "code"}, Name{&s_name, "name"},
                 Name{&s_param, "param"}, Name{&s_confirmed, "confirmed"},
                 Name{&s_choice, "choice"}, Name{&s_mlp, "mlp"}, Name{&s_unfused, "unfused"},
                 Name{&s_saves_pre, "saves_pre"},
                 Name{&s_extension, "extension"}}) {
    *n.slot = PyUnicode_InternFromString(n.text);
    if (*n.slot == nullptr) return nullptr;
  }
  return PyModule_Create(&module_def);
}
