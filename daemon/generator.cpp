// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined-generator: a systemd generator (systemd.generator(7)) that turns the image-dirs of
// qmachined's configuration file into a drop-in for qmachined.service, which runs under
// ProtectSystem=strict: the directories become ReadWritePaths= (with '-': a missing one is not an
// error), and one under /home, /root or /run/user lowers ProtectHome= to read-only, so it can be
// made writable. Run by systemd at boot and at every `systemctl daemon-reload`, as
//   qmachined-generator NORMAL_DIR [EARLY_DIR LATE_DIR]
// It writes NORMAL_DIR/qmachined.service.d/50-image-dirs.conf. The configuration file is
// QM_GENERATOR_CONFIG (tests) or the one qmachined.service passes; a missing file means the
// defaults. A file qmachined would refuse writes nothing and fails (systemd logs it), so the
// unit's own sandbox stays as it is.
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "daemon/config.hpp"

#ifndef QM_SERVICE_CONFIG
#define QM_SERVICE_CONFIG "/etc/qmachined/qmachined.conf"
#endif

namespace {

bool under(std::string_view dir, std::string_view top)
{
    return dir == top || (dir.size() > top.size() && dir.substr(0, top.size()) == top &&
                          dir[top.size()] == '/');
}

int run(int argc, char** argv)
{
    if (argc != 2 && argc != 4) {
        std::fprintf(stderr, "qmachined-generator: usage: qmachined-generator NORMAL_DIR "
                             "[EARLY_DIR LATE_DIR]\n");
        return 2;
    }
    const char* env_config = std::getenv("QM_GENERATOR_CONFIG");
    const std::string config_path = env_config != nullptr ? env_config : QM_SERVICE_CONFIG;

    // The system service's defaults, then the file.
    auto config = qm::daemon::default_config(true, [](const char*) { return nullptr; });
    if (!config) {
        std::fprintf(stderr, "qmachined-generator: %s\n", config.error().message.c_str());
        return 1;
    }
    struct stat st {};
    if (::stat(config_path.c_str(), &st) == 0) {
        if (auto applied = qm::daemon::apply_config_file(*config, config_path); !applied) {
            std::fprintf(stderr, "qmachined-generator: %s: nothing written\n",
                         applied.error().message.c_str());
            return 1;
        }
    } else if (errno != ENOENT) {
        std::fprintf(stderr, "qmachined-generator: cannot read '%s': %s: nothing written\n",
                     config_path.c_str(), std::strerror(errno));
        return 1;
    }

    std::string text = fmt::format(
        "# Written by qmachined-generator from {} (image-dirs): edit that file and run\n"
        "# `systemctl daemon-reload`, not this one.\n[Service]\n",
        config_path);
    bool in_home = false;
    for (const std::string& dir : config->image_dirs) {
        // image-dirs refuses white space, quotes, '\\' and '%': each goes in as it is.
        text += fmt::format("ReadWritePaths=-{}\n", dir);
        in_home = in_home || under(dir, "/home") || under(dir, "/root") || under(dir, "/run/user");
    }
    if (in_home) {
        text += "ProtectHome=read-only\n";
    }

    const std::string dropin_dir = std::string(argv[1]) + "/qmachined.service.d";
    if (::mkdir(dropin_dir.c_str(), 0755) != 0 && errno != EEXIST) {
        std::fprintf(stderr, "qmachined-generator: cannot create '%s': %s\n", dropin_dir.c_str(),
                     std::strerror(errno));
        return 1;
    }
    const std::string path = dropin_dir + "/50-image-dirs.conf";
    std::FILE* f = std::fopen(path.c_str(), "we");
    if (f == nullptr) {
        std::fprintf(stderr, "qmachined-generator: cannot write '%s': %s\n", path.c_str(),
                     std::strerror(errno));
        return 1;
    }
    const bool written = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    if (std::fclose(f) != 0 || !written) {
        std::fprintf(stderr, "qmachined-generator: cannot write '%s'\n", path.c_str());
        std::remove(path.c_str());
        return 1;
    }
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    return run(argc, argv);
}
