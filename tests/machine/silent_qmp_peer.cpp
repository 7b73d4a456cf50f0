// SPDX-License-Identifier: GPL-2.0-or-later
// A stand-in for QEMU that connects to the QMP socket on its command line and never greets:
// used as a Machine wrapper ("silent_qmp_peer qemu-system-x86_64 ... -chardev socket,id=mon,
// path=P ..."), it makes the "no greeting in time" fault. It exits when the peer hangs up.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

int main(int argc, char** argv)
{
    const std::string prefix = "socket,id=mon,path=";
    std::string path;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg.rfind(prefix, 0) == 0) {
            path = arg.substr(prefix.size());
        }
    }
    sockaddr_un sa{};
    if (path.empty() || path.size() >= sizeof(sa.sun_path)) {
        std::fprintf(stderr, "silent_qmp_peer: no usable 'socket,id=mon,path=' argument\n");
        return 2;
    }
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), path.size());
    if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
        std::perror("silent_qmp_peer: connect");
        return 3;
    }
    std::fprintf(stderr, "silent_qmp_peer: connected to %s, saying nothing\n", path.c_str());
    char buf[4096];
    while (::read(fd, buf, sizeof(buf)) > 0) {
        // whatever the client sends, no answer
    }
    ::close(fd);
    return 0;
}
