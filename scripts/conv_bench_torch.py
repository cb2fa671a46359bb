"""PyTorch CPU 3x3 conv2d GFLOP/s at the shapes of crates/supir/examples/conv_bench.rs (2 threads).

usage: python scripts/conv_bench_torch.py  (prints best-wall | mean-CPU-time GFLOP/s, NCHW and channels-last)"""
import time, torch
torch.set_num_threads(2)
shapes=[(1,64,32,256,256),(1,96,32,256,256),(1,128,32,256,256),(1,160,32,256,256),(1,192,64,256,256),(2,640,640,32,32),(2,320,320,64,64),(1,128,128,256,256)]
print("torch", torch.__version__, "threads", torch.get_num_threads(), "mkldnn", torch.backends.mkldnn.is_available())
for (n,ci,co,h,w) in shapes:
    x=torch.randn(n,ci,h,w); wt=torch.randn(co,ci,3,3)/(9*ci)**.5; b=torch.zeros(co)
    fl=2*9*ci*co*n*h*w
    with torch.no_grad():
        for cl in (False, True):
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            ww = wt.contiguous(memory_format=torch.channels_last) if cl else wt
            torch.nn.functional.conv2d(xx,ww,b,padding=1)
            c0=time.process_time(); best=1e9
            for _ in range(5):
                t=time.perf_counter(); torch.nn.functional.conv2d(xx,ww,b,padding=1); best=min(best,time.perf_counter()-t)
            cpu=(time.process_time()-c0)/5
            print(f"{n} x {ci}->{co} x {h}x{w} {'NHWC' if cl else 'NCHW'}: {fl/best/1e9:6.1f} | {fl/(cpu/2)/1e9:6.1f} GFLOP/s")
