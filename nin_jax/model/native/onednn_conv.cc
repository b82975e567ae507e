// One NIN layer, relu(conv(x, w) + b), and Caffe's max pool as oneDNN primitives behind XLA
// FFI handlers (nin_jax/onednn.py): XLA:CPU's own convolutions and dots ran at ~1/2-2/3 of
// oneDNN's speed in this project's training step on AVX-512.
//
// Images are NHWC, kernels HWIO (a 1x1 layer is a 1x1 kernel), all operands of one call either
// float32 or bfloat16, accumulated in float32 either way. Whether oneDNN's bfloat16 kernels
// beat its float32 ones depends on the CPU (AMX tiles: 4-9x faster; AVX512-BF16 on Zen 4:
// faster; AVX2 only: not implemented), so nin_jax/onednn.py times both before it uses them:
//   NinConvReluForward          (x, w, b) -> y = relu(conv(x, w) + b), bias and ReLU fused
//   NinConvBackwardData         (dz, w)   -> dx
//   NinConvBackwardWeights      (x, dz)   -> (dw, db)
//   NinMaxPoolForward           x         -> (y, workspace)
//   NinMaxPoolBackward          (dy, workspace) -> dx
// where dz is the gradient at the convolution's output (the ReLU's mask already applied).
//
// Primitives (and the reorders of a kernel to and from the layout its primitive picked) are
// built once per geometry and cached. XLA calls handlers from any of its threads, possibly
// two at once, so every primitive takes a user scratchpad (oneDNN's own is shared by all
// primitives and tied to the creating thread) from buffers private to the calling thread,
// which also hold the reordered kernel and are reused from call to call.
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <new>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Args = std::unordered_map<int, memory>;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A 64-byte aligned buffer of the calling thread that only grows.
class ThreadBuffer {
 public:
  ~ThreadBuffer() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
      if (data_ == nullptr) throw std::bad_alloc();
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

enum Buffer { kScratchpad, kKernel };

void* CallBuffer(Buffer which, size_t bytes) {
  thread_local ThreadBuffer buffers[2];
  return buffers[which].Get(bytes);
}

struct Primitive {
  dnnl::primitive primitive;
  size_t scratchpad_bytes = 0;
  memory::desc aux;          // the kernel in the layout the convolution picked; a max pool's workspace
  dnnl::primitive reorder;   // the kernel between the user's HWIO and `aux`, if they differ
  bool has_reorder = false;
};

// The primitive cached under `key`, built by `build` the first time.
template <typename Builder>
const Primitive& Lookup(const std::string& key, Builder build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::unique_ptr<Primitive>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<Primitive>& slot = cache[key];
  if (!slot) slot = build();
  return *slot;
}

std::string Key(const char* what, std::initializer_list<const memory::dims*> all_dims) {
  std::string key = what;
  for (const memory::dims* dims : all_dims)
    for (memory::dim d : *dims) key += "," + std::to_string(d);
  return key;
}

// Runs `p` on `stream` with the calling thread's scratchpad.
void Execute(const Primitive& p, Args args, dnnl::stream& stream) {
  if (p.scratchpad_bytes > 0)
    args[DNNL_ARG_SCRATCHPAD] =
        memory({{static_cast<memory::dim>(p.scratchpad_bytes)}, memory::data_type::u8, memory::format_tag::a},
               Engine(), CallBuffer(kScratchpad, p.scratchpad_bytes));
  p.primitive.execute(stream, args);
}

// Runs a handler's body, turning any exception (oneDNN's, a failed allocation, anything else)
// into an FFI error: an exception that left the handler would end the process in std::terminate.
template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    return body();
  } catch (const std::exception& error) {
    return ffi::Error::Internal(std::string("nin_jax oneDNN: ") + error.what());
  } catch (...) {
    return ffi::Error::Internal("nin_jax oneDNN: an unknown C++ exception");
  }
}

// The OpenMP team oneDNN opens in each call: the CPUs this process may use (its affinity mask
// and any cgroup quota, counted by nin_jax/onednn.py), not every CPU the machine has.
int threads = 0;  // 0: OpenMP's own default

void UseThreads() {
  if (threads > 0 && omp_get_max_threads() != threads) omp_set_num_threads(threads);
}

// ---- Convolutions -------------------------------------------------------------------------

enum Pass { kForward, kBackwardData, kBackwardWeights };

// oneDNN's logical dims: images {N, C, H, W}, kernel {O, I, KH, KW}, bias {O}.
struct Geometry {
  memory::dims x, w, y, strides, pad_lo, pad_hi;
  memory::data_type type;
};

memory::desc Images(const memory::dims& dims, memory::data_type type) {
  return {dims, type, memory::format_tag::nhwc};
}
memory::desc Bias(const Geometry& g) { return {{g.w[0]}, g.type, memory::format_tag::a}; }
memory::desc UserKernel(const Geometry& g) { return {g.w, g.type, memory::format_tag::hwio}; }

std::unique_ptr<Primitive> BuildConvolution(Pass pass, const Geometry& g) {
  const auto algo = dnnl::algorithm::convolution_direct;
  const memory::desc x = Images(g.x, g.type), y = Images(g.y, g.type), bias = Bias(g);
  const memory::desc any_w(g.w, g.type, memory::format_tag::any);
  dnnl::primitive_attr fused = UserScratchpad();
  dnnl::post_ops relu;
  relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  fused.set_post_ops(relu);
  dnnl::convolution_forward::primitive_desc forward(Engine(), dnnl::prop_kind::forward_training, algo, x, any_w,
                                                    bias, y, g.strides, g.pad_lo, g.pad_hi, fused);
  auto built = std::make_unique<Primitive>();
  if (pass == kForward) {
    built->primitive = dnnl::convolution_forward(forward);
    built->scratchpad_bytes = forward.scratchpad_desc().get_size();
    built->aux = forward.weights_desc();
  } else if (pass == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), algo, x, any_w, y, g.strides, g.pad_lo,
                                                       g.pad_hi, forward, UserScratchpad());
    built->primitive = dnnl::convolution_backward_data(pd);
    built->scratchpad_bytes = pd.scratchpad_desc().get_size();
    built->aux = pd.weights_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), algo, x, any_w, bias, y, g.strides,
                                                          g.pad_lo, g.pad_hi, forward, UserScratchpad());
    built->primitive = dnnl::convolution_backward_weights(pd);
    built->scratchpad_bytes = pd.scratchpad_desc().get_size();
    built->aux = pd.diff_weights_desc();
  }
  if (built->aux != UserKernel(g)) {
    // Reorders need no scratchpad; their default attribute would share oneDNN's global one.
    const bool to_user = pass == kBackwardWeights;
    dnnl::reorder::primitive_desc pd(Engine(), to_user ? built->aux : UserKernel(g), Engine(),
                                     to_user ? UserKernel(g) : built->aux, UserScratchpad());
    if (pd.scratchpad_desc().get_size() != 0)
      throw dnnl::error(dnnl_unimplemented, "a kernel reorder that needs a scratchpad");
    built->reorder = dnnl::reorder(pd);
    built->has_reorder = true;
  }
  return built;
}

// oneDNN's type for an operand's XLA type; false for types other than float32 and bfloat16.
bool OneDnnType(ffi::DataType type, memory::data_type* out) {
  if (type == ffi::DataType::F32) *out = memory::data_type::f32;
  else if (type == ffi::DataType::BF16) *out = memory::data_type::bf16;
  else return false;
  return true;
}

// The type every operand shares; false if they differ or are neither float32 nor bfloat16.
bool SharedType(std::initializer_list<ffi::DataType> types, memory::data_type* out) {
  for (ffi::DataType type : types)
    if (type != *types.begin()) return false;
  return OneDnnType(*types.begin(), out);
}

// A window's output size along one axis (floor rounding, as XLA and Caffe's convolutions).
int64_t OutputSize(int64_t size, int64_t window, int64_t stride, int64_t pad_lo, int64_t pad_hi) {
  return (size + pad_lo + pad_hi - window) / stride + 1;
}

// NHWC/HWIO dims to oneDNN's logical order, or why they do not make one layer: ranks other
// than 4, a stride below 1, negative padding, or sizes that disagree (batch, channels, the
// output's height and width, the bias's width). oneDNN reads and writes raw pointers of the
// sizes it is told, so each operand is checked here, not trusted.
std::string MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                         size_t bias_elements, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                         int64_t pad_bottom, int64_t pad_left, int64_t pad_right, Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4)
    return "operands must be NHWC images and an HWIO kernel";
  if (stride_h < 1 || stride_w < 1 || pad_top < 0 || pad_bottom < 0 || pad_left < 0 || pad_right < 0)
    return "strides must be at least 1 and padding at least 0";
  if (x[0] != y[0] || x[3] != w[2] || y[3] != w[3])
    return "the images' batch or channels do not match the kernel's input and output channels";
  if (y[1] != OutputSize(x[1], w[0], stride_h, pad_top, pad_bottom) ||
      y[2] != OutputSize(x[2], w[1], stride_w, pad_left, pad_right))
    return "the output's height or width is not what the kernel, strides and padding give";
  if (bias_elements != static_cast<size_t>(w[3]))
    return "the bias (or its gradient) must have one element per output channel";
  *g = Geometry{{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]},
                {stride_h, stride_w}, {pad_top, pad_left}, {pad_bottom, pad_right}, memory::data_type::f32};
  return "";
}

// Runs one pass; `w` is the caller's HWIO kernel (read, or written by the weights pass).
ffi::Error RunConvolution(Pass pass, const Geometry& g, void* w, Args args, int w_arg) {
  UseThreads();
  const std::string name = std::string(pass == kForward ? "f" : pass == kBackwardData ? "d" : "w") +
                           std::to_string(static_cast<int>(g.type));
  const Primitive& p = Lookup(Key(name.c_str(), {&g.x, &g.w, &g.y, &g.strides, &g.pad_lo, &g.pad_hi}),
                              [&] { return BuildConvolution(pass, g); });
  memory user_w(UserKernel(g), Engine(), w);
  memory w_mem = p.has_reorder ? memory(p.aux, Engine(), CallBuffer(kKernel, p.aux.get_size())) : user_w;
  dnnl::stream stream(Engine());
  if (p.has_reorder && pass != kBackwardWeights)
    p.reorder.execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, w_mem}});
  args[w_arg] = w_mem;
  Execute(p, args, stream);
  if (p.has_reorder && pass == kBackwardWeights)
    p.reorder.execute(stream, {{DNNL_ARG_FROM, w_mem}, {DNNL_ARG_TO, user_w}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error LayerError(const std::string& why) {
  return ffi::Error::InvalidArgument("nin_jax oneDNN layer: " + why);
}
const char kTypeError[] = "operands must all be float32 or all bfloat16";

using Float = ffi::AnyBuffer;  // float32 or bfloat16, checked by SharedType
using FloatResult = ffi::Result<ffi::AnyBuffer>;
using U8 = ffi::Buffer<ffi::U8>;

ffi::Error Forward(Float x, Float w, Float b, FloatResult y, int64_t stride_h, int64_t stride_w,
                   int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Guarded([&] {
    Geometry g;
    const std::string bad = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), b.element_count(),
                                         stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, &g);
    if (!bad.empty()) return LayerError(bad);
    if (!SharedType({x.element_type(), w.element_type(), b.element_type(), y->element_type()}, &g.type))
      return LayerError(kTypeError);
    dnnl::engine& e = Engine();
    Args args{{DNNL_ARG_SRC, memory(Images(g.x, g.type), e, x.untyped_data())},
              {DNNL_ARG_BIAS, memory(Bias(g), e, b.untyped_data())},
              {DNNL_ARG_DST, memory(Images(g.y, g.type), e, y->untyped_data())}};
    return RunConvolution(kForward, g, w.untyped_data(), args, DNNL_ARG_WEIGHTS);
  });
}

ffi::Error BackwardData(Float dz, Float w, FloatResult dx, int64_t stride_h, int64_t stride_w,
                        int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Guarded([&] {
    Geometry g;
    const std::string bad = MakeGeometry(dx->dimensions(), w.dimensions(), dz.dimensions(),
                                         static_cast<size_t>(w.dimensions().back()), stride_h, stride_w,
                                         pad_top, pad_bottom, pad_left, pad_right, &g);
    if (!bad.empty()) return LayerError(bad);
    if (!SharedType({dz.element_type(), w.element_type(), dx->element_type()}, &g.type))
      return LayerError(kTypeError);
    dnnl::engine& e = Engine();
    Args args{{DNNL_ARG_DIFF_DST, memory(Images(g.y, g.type), e, dz.untyped_data())},
              {DNNL_ARG_DIFF_SRC, memory(Images(g.x, g.type), e, dx->untyped_data())}};
    return RunConvolution(kBackwardData, g, w.untyped_data(), args, DNNL_ARG_WEIGHTS);
  });
}

ffi::Error BackwardWeights(Float x, Float dz, FloatResult dw, FloatResult db, int64_t stride_h,
                           int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right) {
  return Guarded([&] {
    Geometry g;
    const std::string bad = MakeGeometry(x.dimensions(), dw->dimensions(), dz.dimensions(), db->element_count(),
                                         stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, &g);
    if (!bad.empty()) return LayerError(bad);
    if (!SharedType({x.element_type(), dz.element_type(), dw->element_type(), db->element_type()}, &g.type))
      return LayerError(kTypeError);
    dnnl::engine& e = Engine();
    Args args{{DNNL_ARG_SRC, memory(Images(g.x, g.type), e, x.untyped_data())},
              {DNNL_ARG_DIFF_DST, memory(Images(g.y, g.type), e, dz.untyped_data())},
              {DNNL_ARG_DIFF_BIAS, memory(Bias(g), e, db->untyped_data())}};
    return RunConvolution(kBackwardWeights, g, dw->untyped_data(), args, DNNL_ARG_DIFF_WEIGHTS);
  });
}

// ---- Max pooling --------------------------------------------------------------------------
// x -> (y, workspace), (dy, workspace) -> dx. The workspace (which input each output took,
// one byte per output for the 3x3 windows here) carries the forward's choice into the
// backward pass.

enum PoolPass { kPoolInference, kPoolTraining, kPoolBackward };

struct PoolGeometry {
  memory::dims x, y, window, strides, pad_lo, pad_hi;
  memory::data_type type;
};

std::unique_ptr<Primitive> BuildPool(PoolPass pass, const PoolGeometry& g) {
  const auto prop =
      pass == kPoolInference ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training;
  const memory::desc x = Images(g.x, g.type), y = Images(g.y, g.type);
  dnnl::pooling_forward::primitive_desc forward(Engine(), prop, dnnl::algorithm::pooling_max, x, y, g.strides,
                                                g.window, {0, 0}, g.pad_lo, g.pad_hi, UserScratchpad());
  auto built = std::make_unique<Primitive>();
  built->aux = forward.workspace_desc();
  if (pass == kPoolBackward) {
    dnnl::pooling_backward::primitive_desc pd(Engine(), dnnl::algorithm::pooling_max, x, y, g.strides, g.window,
                                              {0, 0}, g.pad_lo, g.pad_hi, forward, UserScratchpad());
    built->primitive = dnnl::pooling_backward(pd);
    built->scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
    built->primitive = dnnl::pooling_forward(forward);
    built->scratchpad_bytes = forward.scratchpad_desc().get_size();
  }
  return built;
}

// The pool's dims in oneDNN's order, or why they do not make one pool (as MakeGeometry).
std::string MakePoolGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, int64_t window,
                             int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                             int64_t pad_left, int64_t pad_right, PoolGeometry* g) {
  if (x.size() != 4 || y.size() != 4) return "operands must be NHWC images";
  if (window < 1 || stride_h < 1 || stride_w < 1 || pad_top < 0 || pad_bottom < 0 || pad_left < 0 ||
      pad_right < 0)
    return "the window and strides must be at least 1 and padding at least 0";
  if (x[0] != y[0] || x[3] != y[3] || y[1] != OutputSize(x[1], window, stride_h, pad_top, pad_bottom) ||
      y[2] != OutputSize(x[2], window, stride_w, pad_left, pad_right))
    return "the output's shape is not what the window, strides and padding give";
  *g = PoolGeometry{{x[0], x[3], x[1], x[2]}, {y[0], y[3], y[1], y[2]}, {window, window},
                    {stride_h, stride_w}, {pad_top, pad_left}, {pad_bottom, pad_right},
                    memory::data_type::f32};
  return "";
}

ffi::Error PoolError(const std::string& why) {
  return ffi::Error::InvalidArgument("nin_jax oneDNN max pool: " + why);
}

ffi::Error RunPool(PoolPass pass, const PoolGeometry& g, size_t workspace_bytes, Args args,
                   uint8_t* workspace) {
  UseThreads();
  const std::string name = "p" + std::to_string(pass) + "," + std::to_string(static_cast<int>(g.type));
  const Primitive& p = Lookup(Key(name.c_str(), {&g.x, &g.y, &g.window, &g.strides, &g.pad_lo, &g.pad_hi}),
                              [&] { return BuildPool(pass, g); });
  if (pass != kPoolInference) {
    if (p.aux.get_size() != workspace_bytes)
      return PoolError("a workspace of " + std::to_string(p.aux.get_size()) + " bytes, not one byte per output");
    args[DNNL_ARG_WORKSPACE] = memory(p.aux, Engine(), workspace);
  }
  dnnl::stream stream(Engine());
  Execute(p, args, stream);
  stream.wait();
  return ffi::Error::Success();
}

const char kPoolTypeError[] = "images must both be float32 or both bfloat16";

// Without `training`, the workspace is left unwritten (an evaluation needs no backward pass).
ffi::Error MaxPoolForward(Float x, FloatResult y, ffi::ResultBuffer<ffi::U8> workspace, int64_t window,
                          int64_t training, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                          int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Guarded([&] {
    PoolGeometry g;
    const std::string bad = MakePoolGeometry(x.dimensions(), y->dimensions(), window, stride_h, stride_w,
                                             pad_top, pad_bottom, pad_left, pad_right, &g);
    if (!bad.empty()) return PoolError(bad);
    if (!SharedType({x.element_type(), y->element_type()}, &g.type)) return PoolError(kPoolTypeError);
    return RunPool(training ? kPoolTraining : kPoolInference, g, workspace->element_count(),
                   {{DNNL_ARG_SRC, memory(Images(g.x, g.type), Engine(), x.untyped_data())},
                    {DNNL_ARG_DST, memory(Images(g.y, g.type), Engine(), y->untyped_data())}},
                   workspace->typed_data());
  });
}

ffi::Error MaxPoolBackward(Float dy, U8 workspace, FloatResult dx, int64_t window, int64_t stride_h,
                           int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right) {
  return Guarded([&] {
    PoolGeometry g;
    const std::string bad = MakePoolGeometry(dx->dimensions(), dy.dimensions(), window, stride_h, stride_w,
                                             pad_top, pad_bottom, pad_left, pad_right, &g);
    if (!bad.empty()) return PoolError(bad);
    if (!SharedType({dy.element_type(), dx->element_type()}, &g.type)) return PoolError(kPoolTypeError);
    return RunPool(kPoolBackward, g, workspace.element_count(),
                   {{DNNL_ARG_DIFF_DST, memory(Images(g.y, g.type), Engine(), dy.untyped_data())},
                    {DNNL_ARG_DIFF_SRC, memory(Images(g.x, g.type), Engine(), dx->untyped_data())}},
                   workspace.typed_data());
  });
}

// The geometry attributes every handler takes, after its buffers.
template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NinConvReluForward, Forward,
                              WithGeometry(ffi::Ffi::Bind().Arg<Float>().Arg<Float>().Arg<Float>().Ret<Float>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NinConvBackwardData, BackwardData,
                              WithGeometry(ffi::Ffi::Bind().Arg<Float>().Arg<Float>().Ret<Float>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NinConvBackwardWeights, BackwardWeights,
                              WithGeometry(ffi::Ffi::Bind().Arg<Float>().Arg<Float>().Ret<Float>().Ret<Float>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NinMaxPoolForward, MaxPoolForward,
                              WithGeometry(ffi::Ffi::Bind().Arg<Float>().Ret<Float>().Ret<U8>()
                                               .Attr<int64_t>("window").Attr<int64_t>("training")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NinMaxPoolBackward, MaxPoolBackward,
                              WithGeometry(ffi::Ffi::Bind().Arg<Float>().Arg<U8>().Ret<Float>()
                                               .Attr<int64_t>("window")));

// The OpenMP threads of every later call (see UseThreads); nin_jax/onednn.py calls it once.
extern "C" void NinSetThreads(int count) { threads = count; }

// oneDNN's version, major * 10000 + minor * 100 + patch: what the library was built against
// must be what it runs with (nin_jax/onednn.py rebuilds when they differ).
extern "C" int NinOneDnnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return static_cast<int>(v->major * 10000 + v->minor * 100 + v->patch);
}
