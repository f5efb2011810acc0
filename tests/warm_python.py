"""
A Python interpreter that has imported torch once and forks a child for each script the tests run (conftest's
run_python): the child runs `python script args` or `python -c code args` as a fresh interpreter would, in its own
cwd and environment, writing its stdout and stderr to files, but skips the seconds of importing torch and
torch._dynamo (which torch.optim imports) that every script of the suite spends first.
Requests and replies are JSON lines on stdin and stdout: {cwd, env, argv, code, out, err, timeout} -> {returncode}.
"""
import atexit
import json
import os
import runpy
import signal
import sys
import time
import traceback

import numpy  # noqa: F401
import torch  # noqa: F401
import torch._dynamo  # noqa: F401

# torch._dynamo imports tqdm, which takes `time` from the time module as it loads: the scripts import it afresh, so
# that a clock a test patches ahead of that import reaches tqdm's progress bars, as in a fresh interpreter
for name in [m for m in sys.modules if m == 'tqdm' or m.startswith('tqdm.')]:
    del sys.modules[name]


def run_child(request):
    """ runs in the forked child: never returns """
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests stay the warm interpreter's
    for fd, path in ((1, request['out']), (2, request['err'])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code, killed_by = 0, None
    try:
        if request['code'] is not None:  # python -c code args
            sys.argv, sys.path[0] = ['-c', *request['argv']], ''
            exec(compile(request['code'], '<string>', 'exec'), {'__name__': '__main__'})
        else:  # python script args
            sys.argv, sys.path[0] = request['argv'], os.path.dirname(os.path.abspath(request['argv'][0]))
            runpy.run_path(request['argv'][0], run_name='__main__')
    except SystemExit as e:  # as the interpreter exits: None is 0, a message is printed and exits 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # the interpreter prints it, then dies of SIGINT
        traceback.print_exc()
        killed_by = signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if killed_by is not None:
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(code)


def main():
    protocol = os.fdopen(os.dup(1), 'w')
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request)
        deadline = time.time() + request['timeout']
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                done = os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        protocol.write(json.dumps({'returncode': os.waitstatus_to_exitcode(done[1])}) + '\n')
        protocol.flush()


if __name__ == '__main__':
    main()
